"""The expert FFN of MixLoRAFFN as one autograd Function: routing, the frozen projections, the
LoRA shrinks, the fused expert SwiGLU, the down projection and the down LoRA.

Each op in `ops` has its own autograd (usable on its own), but a layer step built from them
paid for it on the host: torch.library's autograd wrapper per op and call, the experts' pair
order sorted four times, and separate adds for the input gradient's five terms. At a step of
~86 launches the eager backward was bound by that host time up to T = 4096 at the SPEC shape
(bench/NOTES.md v4). Here the backward is written out once, with the extension's ops and the
frozen weights: one sort (made in the forward), input-gradient terms accumulated in place
(`addmm_`, `add_`), no per-op autograd dispatch. The math is that of the per-op backwards
(ops.py), term for term: the float64 tests hold it to the reference at 1e-10.

Legend: T tokens, H hidden, I intermediate, E experts, k slots, r rank.
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import ops

_ops = ops._ops

# Dispatch straight to the ops' CPU / CUDA kernels, past their autograd kernels (torch.library's
# Python wrapper: ~30 us per call on the host, and nothing to record inside a Function). A
# private guard of PyTorch's; without it the ops still work, only slower. The backward reads
# ctx.saved_tensors before entering it: under non-reentrant activation checkpointing that read
# re-runs the checkpointed forward, which must record autograd as usual.
_below_autograd = getattr(torch._C, "_AutoDispatchBelowAutograd", contextlib.nullcontext)


def _cast(w: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if w is None else w.to(dtype)


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
        with _below_autograd():
            return ExpertFFN._forward(ctx, x, router, Ag, Bg, Au, Bu, Ad, Bd, layer, dropout_p, seed)

    @staticmethod
    def inference(x: Tensor, router: Tensor, Ag: Optional[Tensor], Bg: Optional[Tensor],
                  Au: Optional[Tensor], Bu: Optional[Tensor], Ad: Optional[Tensor],
                  Bd: Optional[Tensor], layer, dropout_p: float, seed: int):
        """The forward alone, for callers without grad mode: no autograd node, no saved state
        (nor the pair sort the backward needs)."""
        with _below_autograd():
            return ExpertFFN._forward(None, x, router, Ag, Bg, Au, Bu, Ad, Bd, layer, dropout_p, seed)

    @staticmethod
    def _forward(ctx, x, router, Ag, Bg, Au, Bu, Ad, Bd, layer, dropout_p, seed):
        dtype, acc = x.dtype, ops.acc_dtype(x.dtype)
        base = layer.base_layer
        # The frozen GEMMs first: the GPU runs them while the host issues the small ops below
        # (issued after them, those left the GPU idle for their host time: bench/NOTES.md v5c).
        G = F.linear(x, base.gate_proj.weight, base.gate_proj.bias)             # [T, I]
        U = F.linear(x, base.up_proj.weight, base.up_proj.bias)
        logits = _ops.router_logits(x, router.to(acc))                          # [T, E] acc
        weights, ids, probs = _ops.topk_gating(logits, layer.top_k)             # [T, k] ...
        Ag_c, Bg_c, Au_c, Bu_c, Ad_c, Bd_c = (_cast(w, dtype) for w in (Ag, Bg, Au, Bu, Ad, Bd))
        zg = _ops.lora_shrink(x, Ag_c, ids, dropout_p, seed, ops.STREAM_GATE) if Ag is not None else None
        zu = _ops.lora_shrink(x, Au_c, ids, dropout_p, seed, ops.STREAM_UP) if Au is not None else None
        hbar, zd = _ops.moe_swiglu(G, U, ids, weights, zg, Bg_c, zu, Bu_c, Ad_c, layer.scaling,
                                   layer.activation, dropout_p, seed)           # [T, I], [T, k, r]
        down = base.down_proj
        if Bd is not None:  # the down LoRA, then the frozen GEMM onto it (beta = 1: no add pass)
            out = _ops.lora_expand(zd, Bd_c, ids, weights * layer.scaling, 0.0, 0, 0)  # [T, H]
            out.addmm_(hbar, down.weight.t())
            if down.bias is not None:
                out.add_(down.bias)
        else:
            out = F.linear(hbar, down.weight, down.bias)                        # [T, H]
        if ctx is None:  # ExpertFFN.inference
            return out, probs, ids
        ctx.mark_non_differentiable(ids)
        if not any(ctx.needs_input_grad):  # no backward: nothing to sort or keep
            return out, probs, ids
        # The pairs grouped by expert, for every per-expert sum of the backward (sorted once).
        order, offsets, _ = _ops.sort_pairs(ids, layer.num_experts)
        ctx.save_for_backward(x, router, Ag_c, Bg_c, Au_c, Bu_c, Ad_c, Bd_c, weights, ids, probs,
                              G, U, zg, zu, zd, order, offsets)
        ctx.layer, ctx.dropout = layer, (dropout_p, seed)
        ctx.param_dtypes = tuple(None if w is None else w.dtype for w in (router, Ag, Bg, Au, Bu, Ad, Bd))
        return out, probs, ids

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out: Tensor, grad_probs: Tensor, _grad_ids) -> Tuple:
        saved = ctx.saved_tensors
        with _below_autograd():
            return ExpertFFN._backward(ctx, saved, grad_out, grad_probs)

    @staticmethod
    def _backward(ctx, saved, grad_out, grad_probs):
        (x, router, Ag, Bg, Au, Bu, Ad, Bd, weights, ids, probs, G, U, zg, zu, zd, order,
         offsets) = saved
        layer, (p, seed) = ctx.layer, ctx.dropout
        base, s = layer.base_layer, layer.scaling
        acc = ops.acc_dtype(x.dtype)
        need = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        dhbar = grad_out.mm(base.down_proj.weight)  # [T, I]; first, as in the forward

        # Down LoRA (lora_expand with coef = weights * s, no dropout): its z and coef gradients
        # (a shrink through Bd^T) and dBd.
        grad_zd = dBd = None
        dweights = torch.zeros_like(weights)
        if Bd is not None:
            coef = weights * s
            g = _ops.lora_shrink(grad_out, Bd.transpose(1, 2), ids, 0.0, 0, 0)  # [T, k, r]
            grad_zd = g * coef.unsqueeze(-1)
            dweights.add_((g * zd).sum(-1), alpha=s)
            if need[7]:
                dBd = _ops.lora_weight_grad(zd, grad_out, order, offsets, coef, 0.0, 0, 0).transpose(1, 2)

        # The fused SwiGLU: dG, dU, the routing weights' share, dz and the expert weights.
        dG, dU, dw, dzg, dzu, dBg, dBu, dAd = _ops.moe_swiglu_backward(
            dhbar, grad_zd if Ad is not None else None, G, U, ids, weights, zg, Bg, zu, Bu, Ad,
            order, offsets, s, layer.activation, p, seed)
        dweights.add_(dw)
        del dhbar, grad_zd, dw  # ([T, I]: not held while dx is formed; the peak is in this pass)

        # dx: the router's term, the frozen projections accumulated onto it by their GEMMs
        # (beta = 1), then the gate / up shrinks' (expands through A^T with the forward's masks).
        dlogits = _ops.topk_gating_backward(dweights, grad_probs.contiguous(), weights, ids, probs)
        dx, drouter = _ops.router_logits_backward(dlogits, x, router.to(acc))
        dx.addmm_(dG, base.gate_proj.weight)
        dx.addmm_(dU, base.up_proj.weight)
        del dG, dU

        def shrink_backward(A, dz, stream, needed):  # dx += drop(dz A); dA if needed
            if A is None:
                return None
            dx.add_(_ops.lora_expand(dz, A.transpose(1, 2), ids, None, p, seed, stream))
            return _ops.lora_weight_grad(dz, x, order, offsets, None, p, seed, stream) if needed else None

        if p == 0 and Ag is not None and Au is not None:
            # Without dropout both shrinks see the same x: their dx terms are one expand and
            # their weight gradients one lora_weight_grad, over the two LoRAs' ranks side by
            # side (one pass over x and one [T, H] add fewer; bench/NOTES.md v5e).
            Rg = Ag.shape[1]
            dz = torch.cat([dzg, dzu], -1)                                       # [T, k, Rg + Ru]
            dx.add_(_ops.lora_expand(dz, torch.cat([Ag, Au], 1).transpose(1, 2), ids, None, 0.0, 0, 0))
            dA = _ops.lora_weight_grad(dz, x, order, offsets, None, 0.0, 0, 0) if need[2] or need[4] else None
            dAg = dA[:, :Rg].contiguous() if need[2] else None
            dAu = dA[:, Rg:].contiguous() if need[4] else None
        else:
            dAg = shrink_backward(Ag, dzg, ops.STREAM_GATE, need[2])
            dAu = shrink_backward(Au, dzu, ops.STREAM_UP, need[4])

        # (An absent weight's input needs no grad, so its [0]-shaped placeholder is dropped.)
        grads = (drouter, dAg, dBg, dAu, dBu, dAd, dBd)
        out = [dx]
        for g, dtype, needed in zip(grads, ctx.param_dtypes, need[1:8]):
            out.append(g.to(dtype) if needed and g is not None else None)
        return (*out, None, None, None)
