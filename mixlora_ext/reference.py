"""Eager MixLoRA FFN that follows the authors' `mixlora` 0.2.3 to the letter (SPEC section 1).

It loops over experts in Python, runs the frozen down projection once per (token, expert)
pair, computes the router in float32 (float64 for float64 inputs) and the LoRA deltas in the
LoRA weights' dtype, exactly like `MixLoraSparseMoe._llama_forward`. It reads the parameters of
a `MixLoRAFFN`, so a test or a benchmark can run both on the very same weights. It is the
oracle of the tests and the baseline of bench/run.py, and the slow path for DoRA experts.

Legend: T tokens, H hidden, I intermediate, E experts, k slots, r rank.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import STREAM_DOWN, STREAM_GATE, STREAM_UP, acc_dtype, dropout_mask

# drop(z, proj, pair_ids) -> z with LoRA dropout applied; pair_ids [n] are t * k + j.
DropFn = Callable[[Tensor, str, Tensor], Tensor]
_STREAMS = {"gate_proj": STREAM_GATE, "up_proj": STREAM_UP, "down_proj": STREAM_DOWN}


def reference_routing(x2: Tensor, router: Tensor, top_k: int):
    """x2 [T, H] -> (probs [T, E], weights [T, k], ids [T, k] int64), the authors' router."""
    acc = acc_dtype(x2.dtype)
    logits = F.linear(x2.to(acc), router.to(acc))                       # [T, E]
    probs = F.softmax(logits, dim=-1, dtype=acc)                        # [T, E]
    # A stable descending sort puts the lower expert index first among equal probabilities.
    sorted_probs, sorted_ids = torch.sort(probs, dim=-1, descending=True, stable=True)
    weights = sorted_probs[:, :top_k]                                   # [T, k]
    weights = weights / weights.sum(dim=-1, keepdim=True)
    return probs, weights, sorted_ids[:, :top_k]


def dora_scale(layer, proj: str) -> Tensor:
    """[E, out] = magnitude / ||W + s * B_e A_e||_row, the norm detached (authors' apply_dora)."""
    base = getattr(layer.base_layer, proj).weight
    A, B = layer.lora_A[proj], layer.lora_B[proj]                       # [E, r, in], [E, out, r]
    weight = base.to(A.dtype).unsqueeze(0) + layer.scaling * torch.bmm(B, A)   # [E, out, in]
    return layer.magnitude[proj] / torch.linalg.norm(weight, dim=2).detach()


def _make_drop(layer, x2: Tensor, seed: Optional[int]) -> DropFn:
    p = layer.lora_dropout if layer.training else 0.0
    if p == 0.0:
        return lambda z, proj, pairs: z
    if seed is None:  # the authors' semantics: an independent nn.Dropout mask per LoRA call
        return lambda z, proj, pairs: F.dropout(z, p, training=True)
    n_pairs = x2.shape[0] * layer.top_k

    def drop(z, proj, pairs):  # the kernels' counter-based masks, to compare bit for bit
        keep = dropout_mask(z, seed, _STREAMS[proj], n_pairs, z.shape[1], p)[pairs]
        return z * keep.to(z.dtype) / (1.0 - p)

    return drop


def reference_experts(layer, x2: Tensor, weights: Tensor, ids: Tensor, drop: DropFn) -> Tensor:
    """The authors' per-expert loop: x2 [T, H], weights/ids [T, k] -> out [T, H] (x2's dtype)."""
    lora_dtype = layer.router.dtype
    hidden = x2.to(lora_dtype)                                           # authors: hidden_states
    base = layer.base_layer
    common = {"gate_proj": base.gate_proj(x2).to(lora_dtype), "up_proj": base.up_proj(x2).to(lora_dtype)}
    scales = {proj: dora_scale(layer, proj) for proj in layer.lora_A} if layer.use_dora else {}
    out = torch.zeros(x2.shape, dtype=lora_dtype, device=x2.device)     # [T, H]
    expert_mask = F.one_hot(ids.long(), layer.num_experts).permute(2, 1, 0)  # [E, k, T]

    def lora_proj(proj, e, residual, lora_input, pairs):
        if proj not in layer.lora_A:
            return residual
        A, B = layer.lora_A[proj][e], layer.lora_B[proj][e]              # [r, in], [out, r]
        delta = F.linear(F.linear(drop(lora_input.to(lora_dtype), proj, pairs), A), B) * layer.scaling
        if proj in scales:
            scale = scales[proj][e]
            return (scale * residual + scale * delta).to(lora_input.dtype)
        return residual + delta.to(residual.dtype)

    for e in range(layer.num_experts):
        slot, top_x = torch.where(expert_mask[e])  # host-sync-ok: the authors' algorithm
        pairs = top_x * layer.top_k + slot
        rows = hidden[top_x].to(x2.dtype)
        gate = lora_proj("gate_proj", e, common["gate_proj"][top_x].to(x2.dtype), rows, pairs)
        up = lora_proj("up_proj", e, common["up_proj"][top_x].to(x2.dtype), rows, pairs)
        h = layer.act_fn(gate) * up                                      # [n, I]
        y = lora_proj("down_proj", e, base.down_proj(h), h, pairs)       # [n, H]
        out.index_add_(0, top_x, (y * weights[top_x, slot, None]).to(lora_dtype))
    return out.to(x2.dtype)


def reference_forward(layer, x: Tensor, dropout_seed: Optional[int] = None) -> Tensor:
    """The authors' MixLoRA FFN over `layer`'s weights. x [..., H] -> [..., H].

    With LoRA dropout active (training, p > 0), masks are drawn like the authors' nn.Dropout,
    or, given `dropout_seed`, are the kernels' masks for that seed (for exact comparisons).
    Jitter noise is not applied here: it is random, so no comparison could use it.
    """
    x2 = x.reshape(-1, x.shape[-1])
    _, weights, ids = reference_routing(x2, layer.router, layer.top_k)
    out = reference_experts(layer, x2, weights, ids, _make_drop(layer, x2, dropout_seed))
    return out.reshape(x.shape)
