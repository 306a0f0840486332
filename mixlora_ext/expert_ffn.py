"""The expert FFN of MixLoRAFFN as one autograd Function: routing, the frozen projections, the
LoRA shrinks, the fused expert SwiGLU, the down projection and the down LoRA.

Each op in `ops` has its own autograd (usable on its own), but a layer step built from them
paid for it on the host: torch.library's autograd wrapper per op and call, the experts' pair
order sorted four times, and separate adds for the input gradient's five terms (bench/NOTES.md
v4). Here the step is two ops, `expert_ffn` and `expert_ffn_backward`
(csrc/layer/expert_ffn_composite.cpp), composed in C++ of the extension's ops and the frozen
GEMMs: one sort (made in the forward), input-gradient terms accumulated in place, and one
Python-to-C++ call each way instead of ~20 forward and ~40 backward, which set the time of a
step below a few hundred tokens (bench/NOTES.md v6). The math is that of the per-op backwards
(ops.py), term for term: the float64 tests hold it to the reference at 1e-10.

Legend: T tokens, H hidden, I intermediate, E experts, k slots, r rank.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops

_ops = ops._ops

# Dispatch straight to the ops' kernels, past the Autograd dispatch key (the composite ops have
# no autograd kernel of their own: this Function is theirs). A private guard of PyTorch's;
# without it the ops still work, through autograd's fallback. The backward reads
# ctx.saved_tensors before entering it: under non-reentrant activation checkpointing that read
# re-runs the checkpointed forward, which must record autograd as usual.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _step(x: Tensor, router: Tensor, lora: Tuple[Optional[Tensor], ...], layer, dropout_p: float,
          seed: int, save: bool):
    base = layer.base_layer
    gate, up, down = base.gate_proj, base.up_proj, base.down_proj
    with _below_autograd():
        return _ops.expert_ffn(x, gate.weight, gate.bias, up.weight, up.bias, down.weight,
                               down.bias, router, *lora, layer.top_k, layer.scaling,
                               layer.activation, dropout_p, seed, save)


class ExpertFFN(torch.autograd.Function):
    """out [T, H], probs [T, E], ids [T, k] = the MixLoRA expert FFN of x [T, H].

    Inputs: x [T, H]; router [E, H]; the LoRA weights A_gate, B_gate, A_up, B_up, A_down,
    B_down as the layer holds them (float32 [E, r, in] / [E, out, r]; None for projections not
    targeted); `layer` (its frozen base MLP, which must not require grad, top_k, scaling and
    activation); the LoRA dropout p and its seed. Gradients flow to x, the router and the
    LoRA weights, and through probs (the load-balance loss) to the router.
    """

    @staticmethod
    def forward(ctx, x: Tensor, router: Tensor, Ag: Optional[Tensor], Bg: Optional[Tensor],
                Au: Optional[Tensor], Bu: Optional[Tensor], Ad: Optional[Tensor],
                Bd: Optional[Tensor], layer, dropout_p: float, seed: int):
        lora = (Ag, Bg, Au, Bu, Ad, Bd)
        save = any(ctx.needs_input_grad)  # else no backward: nothing to sort or keep
        outs = _step(x, router, lora, layer, dropout_p, seed, save)
        out, probs, ids = outs[:3]
        ctx.mark_non_differentiable(ids)
        if save:
            # weights, G, U, zg, zu, zd, order, offsets, then the LoRA weights in x's dtype
            # (None where a weight already was: then the weight itself).
            casts = (w if c is None else c for c, w in zip(outs[11:], lora))
            ctx.save_for_backward(x, router, ids, probs, *outs[3:11], *casts)
            ctx.layer, ctx.dropout = layer, (dropout_p, seed)
            ctx.param_dtypes = tuple(None if w is None else w.dtype for w in (router, *lora))
        return out, probs, ids

    @staticmethod
    def inference(x: Tensor, router: Tensor, Ag: Optional[Tensor], Bg: Optional[Tensor],
                  Au: Optional[Tensor], Bu: Optional[Tensor], Ad: Optional[Tensor],
                  Bd: Optional[Tensor], layer, dropout_p: float, seed: int):
        """The forward alone, for callers without grad mode: no autograd node, no saved state
        (nor the pair sort the backward needs)."""
        out, probs, ids = _step(x, router, (Ag, Bg, Au, Bu, Ad, Bd), layer, dropout_p, seed, False)
        return out, probs, ids

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_probs: Tensor, _grad_ids) -> Tuple:
        (x, router, ids, probs, weights, G, U, zg, zu, zd, order, offsets,
         *lora) = ctx.saved_tensors
        layer, (p, seed) = ctx.layer, ctx.dropout
        base = layer.base_layer
        with _below_autograd():
            grads = _ops.expert_ffn_backward(
                grad_out, grad_probs, x, base.gate_proj.weight, base.up_proj.weight,
                base.down_proj.weight, router, *lora, weights, ids, probs, G, U, zg, zu, zd,
                order, offsets, layer.scaling, layer.activation, p, seed,
                list(ctx.needs_input_grad[:8]))
        # dx in x's dtype; the router and LoRA gradients in their parameters' dtypes.
        out = [grads[0]]
        for g, dtype in zip(grads[1:], ctx.param_dtypes):
            out.append(g if g is None or g.dtype == dtype else g.to(dtype))
        return (*out, None, None, None)
