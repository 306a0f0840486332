"""The extension's ops: Python wrappers, fake (meta) kernels for torch.compile, and autograd.

Every op is registered in C++ (csrc/registration.cpp) with CPU and, in CUDA builds, CUDA
kernels; docs/design.md gives the exact semantics. Here each op gets a fake kernel (output
shapes follow from input shapes only) and, where it is differentiable, a backward written with
the extension's own ops, so nothing in forward or backward synchronizes with the host.

Legend: T tokens, k slots per token, N = T*k pairs, E experts, R rank, D feature width.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

try:
    from . import _C  # noqa: F401  (loads the library that registers torch.ops.mixlora)
except ImportError as err:  # typically: Python found the source folder, not the installed package
    raise ImportError(
        f"mixlora_ext: the compiled extension _C is missing from {__file__.rsplit('/', 1)[0]}. "
        "Install the package (pip install .) and import it from outside the source folder, or "
        "build it in place (python setup.py build_ext --inplace).") from err

_ops = torch.ops.mixlora

# Activation codes understood by moe_swiglu (csrc/common/activation.h).
ACTIVATIONS = {"silu": 0, "swish": 0, "gelu": 1, "gelu_pytorch_tanh": 2, "gelu_new": 2,
               "gelu_fast": 2, "relu": 3}

# LoRA-dropout streams (csrc/common/dropout_rng.h): one independent mask per LoRA input.
STREAM_GATE, STREAM_UP, STREAM_DOWN = 0, 1, 2


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision every sum is taken in: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def cuda_version() -> int:
    """CUDA version the kernels were built with, or -1 for a CPU-only build."""
    return _ops.cuda_version()


# --------------------------------------------------------------------------------------------
# Public wrappers
# --------------------------------------------------------------------------------------------
def router_logits(x: Tensor, weight: Tensor) -> Tensor:
    """logits [T, E] acc = x [T, H] @ weight [E, H]^T, weight in x's acc dtype (float32 for 16-bit
    x: no float32 copy of x is made)."""
    return _ops.router_logits(x, weight)


def topk_gating(logits: Tensor, k: int) -> Tuple[Tensor, Tensor, Tensor]:
    """logits [T, E] -> (weights [T, k] acc, ids [T, k] int32, probs [T, E] acc)."""
    return _ops.topk_gating(logits, k)


def sort_pairs(ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor, Tensor]:
    """ids [T, k] -> (order [N] int32, offsets [E + 1] int64, position [N] int32)."""
    return _ops.sort_pairs(ids, num_experts)


def gather_pairs(src: Tensor, order: Tensor, k: int, weights: Optional[Tensor] = None) -> Tensor:
    """src [T, D] -> [N, D], row p = weights.flat[order[p]] * src[order[p] // k]."""
    return _ops.gather_pairs(src, order, k, weights)


def scatter_pairs(src: Tensor, position: Tensor, k: int, weights: Optional[Tensor] = None) -> Tensor:
    """src [N, D] -> [T, D], row t = sum_j weights[t, j] * src[position[t*k + j]]."""
    return _ops.scatter_pairs(src, position, k, weights)


def pair_dot(dense: Tensor, paired: Tensor, position: Tensor, k: int) -> Tensor:
    """dense [T, D], paired [N, D] -> [T, k] acc, <dense[t], paired[position[t*k + j]]>."""
    return _ops.pair_dot(dense, paired, position, k)


def lora_shrink(x: Tensor, A: Tensor, ids: Tensor, dropout_p: float = 0.0, seed: int = 0,
                stream: int = 0) -> Tensor:
    """x [T, D], A [E, R, D] -> z [T, k, R] acc, z[t, j] = A[ids[t, j]] @ dropout(x[t])."""
    return _ops.lora_shrink(x, A, ids, dropout_p, seed, stream)


def lora_expand(z: Tensor, B: Tensor, ids: Tensor, coef: Optional[Tensor] = None,
                dropout_p: float = 0.0, seed: int = 0, stream: int = 0) -> Tensor:
    """z [T, k, R], B [E, D, R] -> y [T, D], y[t] = sum_j coef[t, j] * B[ids[t, j]] @ z[t, j]."""
    return _ops.lora_expand(z, B, ids, coef, dropout_p, seed, stream)


def lora_weight_grad(z: Tensor, x: Tensor, order: Tensor, offsets: Tensor,
                     coef: Optional[Tensor] = None, dropout_p: float = 0.0, seed: int = 0,
                     stream: int = 0) -> Tensor:
    """-> [E, R, D] acc: per expert, sum over its pairs of coef * z (outer) dropout(x)."""
    return _ops.lora_weight_grad(z, x, order, offsets, coef, dropout_p, seed, stream)


def dropout_mask(like: Tensor, seed: int, stream: int, rows: int, cols: int, p: float) -> Tensor:
    """The keep mask [rows, cols] (bool) the kernels use for LoRA dropout."""
    return _ops.dropout_mask(like, seed, stream, rows, cols, p)


def moe_swiglu(G: Tensor, U: Tensor, ids: Tensor, weights: Tensor,
               zg: Optional[Tensor], Bg: Optional[Tensor], zu: Optional[Tensor],
               Bu: Optional[Tensor], Ad: Optional[Tensor], scale: float, activation: int,
               dropout_p: float = 0.0, seed: int = 0) -> Tuple[Tensor, Tensor]:
    """Fused expert SwiGLU + weighted combine -> (hbar [T, I], zd [T, k, R] acc)."""
    return _ops.moe_swiglu(G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation, dropout_p, seed)


# --------------------------------------------------------------------------------------------
# Fake kernels: shapes and dtypes from the inputs' shapes alone
# --------------------------------------------------------------------------------------------
def _empty(like: Tensor, shape, dtype=None) -> Tensor:
    return like.new_empty(shape, dtype=dtype if dtype is not None else like.dtype)


@torch.library.register_fake("mixlora::router_logits")
def _(x, weight):
    return _empty(x, (x.shape[0], weight.shape[0]), weight.dtype)


@torch.library.register_fake("mixlora::router_logits_backward")
def _(grad, x, weight):
    return _empty(x, x.shape), _empty(weight, weight.shape)


@torch.library.register_fake("mixlora::topk_gating")
def _(logits, k):
    T, E = logits.shape
    acc = acc_dtype(logits.dtype)
    return _empty(logits, (T, k), acc), _empty(logits, (T, k), torch.int32), _empty(logits, (T, E), acc)


@torch.library.register_fake("mixlora::topk_gating_backward")
def _(grad_weights, grad_probs, weights, ids, probs):
    return _empty(probs, probs.shape)


@torch.library.register_fake("mixlora::sort_pairs")
def _(ids, num_experts):
    n = ids.numel()
    return (_empty(ids, (n,), torch.int32), _empty(ids, (num_experts + 1,), torch.int64),
            _empty(ids, (n,), torch.int32))


@torch.library.register_fake("mixlora::gather_pairs")
def _(src, order, k, weights):
    return _empty(src, (order.shape[0], src.shape[1]))


@torch.library.register_fake("mixlora::scatter_pairs")
def _(src, position, k, weights):
    return _empty(src, (position.shape[0] // k, src.shape[1]))


@torch.library.register_fake("mixlora::pair_dot")
def _(dense, paired, position, k):
    return _empty(dense, (dense.shape[0], k), acc_dtype(dense.dtype))


@torch.library.register_fake("mixlora::lora_shrink")
def _(x, A, ids, dropout_p, seed, stream):
    return _empty(x, (ids.shape[0], ids.shape[1], A.shape[1]), acc_dtype(x.dtype))


@torch.library.register_fake("mixlora::lora_expand")
def _(z, B, ids, coef, dropout_p, seed, stream):
    return _empty(B, (ids.shape[0], B.shape[1]))


@torch.library.register_fake("mixlora::lora_weight_grad")
def _(z, x, order, offsets, coef, dropout_p, seed, stream):
    return _empty(x, (offsets.shape[0] - 1, z.shape[2], x.shape[1]), acc_dtype(x.dtype))


@torch.library.register_fake("mixlora::dropout_mask")
def _(like, seed, stream, rows, cols, p):
    return _empty(like, (rows, cols), torch.bool)


@torch.library.register_fake("mixlora::moe_swiglu")
def _(G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation, dropout_p, seed):
    T, k = ids.shape
    zd_shape = (T, k, Ad.shape[1]) if Ad is not None else (0,)
    return _empty(G, G.shape), _empty(G, zd_shape, acc_dtype(G.dtype))


@torch.library.register_fake("mixlora::moe_swiglu_backward")
def _(grad_hbar, grad_zd, G, U, ids, weights, zg, Bg, zu, Bu, Ad, order, offsets, scale,
      activation, dropout_p, seed):
    acc = acc_dtype(G.dtype)

    def like(t, shape, dtype):
        return _empty(G, shape if t is not None else (0,), dtype)

    return (_empty(G, G.shape), _empty(G, G.shape), _empty(G, ids.shape, acc),
            like(zg, tuple(zg.shape) if zg is not None else (0,), acc),
            like(zu, tuple(zu.shape) if zu is not None else (0,), acc),
            like(Bg, tuple(Bg.shape) if Bg is not None else (0,), G.dtype if Bg is None else Bg.dtype),
            like(Bu, tuple(Bu.shape) if Bu is not None else (0,), G.dtype if Bu is None else Bu.dtype),
            like(Ad, tuple(Ad.shape) if Ad is not None else (0,), G.dtype if Ad is None else Ad.dtype))


# --------------------------------------------------------------------------------------------
# Autograd
# --------------------------------------------------------------------------------------------
def _invert(perm: Tensor) -> Tensor:
    """The inverse of a permutation of 0..N-1 (int32), without leaving the device."""
    inverse = torch.empty_like(perm)
    inverse[perm.long()] = torch.arange(perm.numel(), dtype=perm.dtype, device=perm.device)
    return inverse


def _sorted(ids: Tensor, num_experts: int) -> Tuple[Tensor, Tensor]:
    order, offsets, _ = _ops.sort_pairs(ids, num_experts)
    return order, offsets


# topk_gating ---------------------------------------------------------------------------------
def _gating_setup(ctx, inputs, output):
    weights, ids, probs = output
    ctx.save_for_backward(weights, ids, probs)
    ctx.logits_dtype = inputs[0].dtype


def _gating_backward(ctx, grad_weights, _grad_ids, grad_probs):
    weights, ids, probs = ctx.saved_tensors
    grad = _ops.topk_gating_backward(grad_weights, grad_probs, weights, ids, probs)
    return grad.to(ctx.logits_dtype), None


torch.library.register_autograd("mixlora::topk_gating", _gating_backward, setup_context=_gating_setup)


# router_logits -------------------------------------------------------------------------------
def _router_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _router_backward(ctx, grad):
    x, weight = ctx.saved_tensors
    grad_x, grad_weight = _ops.router_logits_backward(grad, x, weight)
    return (grad_x if ctx.needs_input_grad[0] else None,
            grad_weight if ctx.needs_input_grad[1] else None)


torch.library.register_autograd("mixlora::router_logits", _router_backward, setup_context=_router_setup)


# gather_pairs / scatter_pairs / pair_dot -----------------------------------------------------
def _gather_setup(ctx, inputs, output):
    src, order, k, weights = inputs
    ctx.k = k
    ctx.save_for_backward(src, order, weights)


def _gather_backward(ctx, grad):
    src, order, weights = ctx.saved_tensors
    position = _invert(order)
    grad_src = _ops.scatter_pairs(grad, position, ctx.k, weights) if ctx.needs_input_grad[0] else None
    grad_w = None
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = _ops.pair_dot(src, grad, position, ctx.k).to(weights.dtype)
    return grad_src, None, None, grad_w


def _scatter_setup(ctx, inputs, output):
    src, position, k, weights = inputs
    ctx.k = k
    ctx.save_for_backward(src, position, weights)


def _scatter_backward(ctx, grad):
    src, position, weights = ctx.saved_tensors
    grad_src = None
    if ctx.needs_input_grad[0]:
        grad_src = _ops.gather_pairs(grad, _invert(position), ctx.k, weights)
    grad_w = None
    if weights is not None and ctx.needs_input_grad[3]:
        grad_w = _ops.pair_dot(grad, src, position, ctx.k).to(weights.dtype)
    return grad_src, None, None, grad_w


def _pair_dot_setup(ctx, inputs, output):
    dense, paired, position, k = inputs
    ctx.k = k
    ctx.save_for_backward(dense, paired, position)


def _pair_dot_backward(ctx, grad):
    dense, paired, position = ctx.saved_tensors
    grad_dense = grad_paired = None
    if ctx.needs_input_grad[0]:
        grad_dense = _ops.scatter_pairs(paired, position, ctx.k, grad.to(acc_dtype(paired.dtype)))
    if ctx.needs_input_grad[1]:
        grad_paired = _ops.gather_pairs(dense, _invert(position), ctx.k, grad.to(acc_dtype(dense.dtype)))
    return grad_dense, grad_paired, None, None


torch.library.register_autograd("mixlora::gather_pairs", _gather_backward, setup_context=_gather_setup)
torch.library.register_autograd("mixlora::scatter_pairs", _scatter_backward, setup_context=_scatter_setup)
torch.library.register_autograd("mixlora::pair_dot", _pair_dot_backward, setup_context=_pair_dot_setup)


# lora_shrink / lora_expand -------------------------------------------------------------------
def _shrink_setup(ctx, inputs, output):
    x, A, ids, dropout_p, seed, stream = inputs
    ctx.dropout = (dropout_p, seed, stream)
    ctx.save_for_backward(x, A, ids)


def _shrink_backward(ctx, grad_z):
    x, A, ids = ctx.saved_tensors
    grad_x = grad_A = None
    if ctx.needs_input_grad[0]:
        # dx[t] = sum_j drop_tj(A[e]^T dz[t, j]): an expand through A^T with the forward's mask.
        grad_x = _ops.lora_expand(grad_z, A.transpose(1, 2), ids, None, *ctx.dropout)
    if ctx.needs_input_grad[1]:
        order, offsets = _sorted(ids, A.shape[0])
        grad_A = _ops.lora_weight_grad(grad_z, x, order, offsets, None, *ctx.dropout).to(A.dtype)
    return grad_x, grad_A, None, None, None, None


def _expand_setup(ctx, inputs, output):
    z, B, ids, coef, dropout_p, seed, stream = inputs
    ctx.dropout = (dropout_p, seed, stream)
    ctx.save_for_backward(z, B, ids, coef)


def _expand_backward(ctx, grad_y):
    z, B, ids, coef = ctx.saved_tensors
    need_z, need_B, need_coef = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
    grad_z = grad_B = grad_coef = None
    if need_z or need_coef:
        # B[e]^T applied to the (masked) output gradient: a shrink through B^T.
        g = _ops.lora_shrink(grad_y, B.transpose(1, 2), ids, *ctx.dropout)  # [T, k, R]
        grad_z = g * coef.unsqueeze(-1) if coef is not None else g
        if coef is not None and need_coef:
            grad_coef = (g * z).sum(-1).to(coef.dtype)
    if need_B:
        order, offsets = _sorted(ids, B.shape[0])
        grad_B = _ops.lora_weight_grad(z, grad_y, order, offsets, coef, *ctx.dropout)
        grad_B = grad_B.transpose(1, 2).to(B.dtype)
    return grad_z if need_z else None, grad_B, None, grad_coef, None, None, None


torch.library.register_autograd("mixlora::lora_shrink", _shrink_backward, setup_context=_shrink_setup)
torch.library.register_autograd("mixlora::lora_expand", _expand_backward, setup_context=_expand_setup)


# moe_swiglu ----------------------------------------------------------------------------------
def _swiglu_setup(ctx, inputs, output):
    G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation, dropout_p, seed = inputs
    ctx.params = (scale, activation, dropout_p, seed)
    ctx.num_experts = next(w.shape[0] for w in (Bg, Bu, Ad) if w is not None) \
        if any(w is not None for w in (Bg, Bu, Ad)) else 1
    ctx.save_for_backward(G, U, ids, weights, zg, Bg, zu, Bu, Ad)


def _swiglu_backward(ctx, grad_hbar, grad_zd):
    G, U, ids, weights, zg, Bg, zu, Bu, Ad = ctx.saved_tensors
    if any(w is not None for w in (Bg, Bu, Ad)):
        order, offsets = _sorted(ids, ctx.num_experts)
    else:  # no expert weights, so no per-expert sums: any valid grouping will do (one group)
        n = ids.numel()
        order = torch.arange(n, dtype=torch.int32, device=ids.device)
        offsets = torch.arange(2, dtype=torch.int64, device=ids.device) * n
    dG, dU, dw, dzg, dzu, dBg, dBu, dAd = _ops.moe_swiglu_backward(
        grad_hbar, grad_zd if Ad is not None else None, G, U, ids, weights, zg, Bg, zu, Bu, Ad,
        order, offsets, *ctx.params)

    def present(grad, like):
        return grad if like is not None else None

    return (dG, dU, None, dw, present(dzg, zg), present(dBg, Bg), present(dzu, zu),
            present(dBu, Bu), present(dAd, Ad), None, None, None, None)


torch.library.register_autograd("mixlora::moe_swiglu", _swiglu_backward, setup_context=_swiglu_setup)
