"""Pure-PyTorch references of the torch.ops.mixlora ops, written from docs/design.md.

`ref_<op>` takes the op's arguments and returns what the op returns (same tuple structure,
shapes and dtypes), computing in acc precision (float64 for float64 inputs, else float32) on
whatever device the inputs are on. Clarity over speed: they materialize [T, k, ...] tensors.
LoRA-dropout masks come from torch.ops.mixlora.dropout_mask (tested on its own against a
Python splitmix64), so the extension must be loaded.

Legend: T tokens, k experts per token, N = T*k pairs (q = t*k + j), E experts, R LoRA rank,
D a feature width, I the intermediate size.
"""
import torch
import torch.nn.functional as F

# The activation codes of csrc/common/activation.h.
ACTIVATIONS = {
    0: F.silu,
    1: F.gelu,
    2: lambda x: F.gelu(x, approximate="tanh"),
    3: F.relu,
}


def acc_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def dropout_scale(like, seed, stream, T, k, D, p, dtype):
    """[T, k, D]: keep / (1 - p) of pair q = t*k + j at column d; all ones when p == 0."""
    if p == 0:
        return torch.ones(T, k, D, dtype=dtype, device=like.device)
    keep = torch.ops.mixlora.dropout_mask(like, seed, stream, T * k, D, p)  # [N, D] bool
    return keep.to(dtype).view(T, k, D) / (1 - p)


# --- gating ------------------------------------------------------------------------------
def ref_router_logits(x, weight):
    return x.to(weight.dtype) @ weight.t()


def ref_router_logits_backward(grad, x, weight):
    return (grad @ weight).to(x.dtype), grad.t() @ x.to(weight.dtype)


def ref_topk_gating(logits, k):
    probs = torch.softmax(logits.to(acc_dtype(logits.dtype)), dim=-1)  # [T, E]
    # A stable descending sort puts the lower expert first among equal probs.
    ids = torch.sort(probs, dim=-1, descending=True, stable=True).indices[:, :k]  # [T, k]
    top = probs.gather(1, ids)  # [T, k]
    weights = top / top.sum(-1, keepdim=True)
    return weights, ids.to(torch.int32), probs


def ref_topk_gating_backward(grad_weights, grad_probs, weights, ids, probs):
    ids = ids.long()
    top_sum = probs.gather(1, ids).sum(-1, keepdim=True)  # S_t, [T, 1]
    c = (grad_weights * weights).sum(-1, keepdim=True)  # [T, 1]
    gp = torch.zeros_like(probs) if grad_probs is None else grad_probs.clone()  # [T, E]
    gp.scatter_add_(1, ids, (grad_weights - c) / top_sum)
    return probs * (gp - (probs * gp).sum(-1, keepdim=True))


# --- permutation -------------------------------------------------------------------------
def ref_sort_pairs(ids, num_experts):
    flat = ids.reshape(-1).long()  # [N]
    order = torch.sort(flat, stable=True).indices  # pair ids grouped by expert, ascending q
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.bincount(flat, minlength=num_experts).cumsum(0)
    position = torch.empty_like(order)
    position[order] = torch.arange(order.numel(), device=ids.device)
    return order.to(torch.int32), offsets, position.to(torch.int32)


def ref_gather_pairs(src, order, k, weights):
    acc = acc_dtype(src.dtype)
    q = order.long()  # [N]
    rows = src.to(acc)[q // k]  # [N, D]
    if weights is not None:
        rows = weights.reshape(-1)[q, None] * rows
    return rows.to(src.dtype)


def ref_scatter_pairs(src, position, k, weights):
    acc = acc_dtype(src.dtype)
    N, D = src.shape
    rows = src.to(acc)[position.long()].view(N // k, k, D)  # [T, k, D]
    if weights is not None:
        rows = weights[..., None] * rows
    return rows.sum(1).to(src.dtype)


def ref_pair_dot(dense, paired, position, k):
    acc = acc_dtype(dense.dtype)
    T, D = dense.shape
    rows = paired.to(acc)[position.long()].view(T, k, D)  # [T, k, D]
    return (dense.to(acc)[:, None, :] * rows).sum(-1)


# --- low-rank expert GEMMs ---------------------------------------------------------------
def ref_lora_shrink(x, A, ids, dropout_p, seed, stream):
    acc = acc_dtype(x.dtype)
    T, D = x.shape
    k = ids.shape[1]
    x_drop = x.to(acc)[:, None, :] * dropout_scale(x, seed, stream, T, k, D, dropout_p, acc)  # [T, k, D]
    return torch.einsum("tkrd,tkd->tkr", A.to(acc)[ids.long()], x_drop)


def ref_lora_expand(z, B, ids, coef, dropout_p, seed, stream):
    acc = acc_dtype(B.dtype)
    T, k, _ = z.shape
    D = B.shape[1]
    y = torch.einsum("tkdr,tkr->tkd", B.to(acc)[ids.long()], z)  # [T, k, D]
    y = y * dropout_scale(z, seed, stream, T, k, D, dropout_p, acc)
    if coef is not None:
        y = coef[..., None] * y
    return y.sum(1).to(B.dtype)


def pair_experts(order, offsets):
    """[N] int64: the expert of each pair q, from the sorted grouping (pairs
    order[offsets[e]:offsets[e+1]] are expert e's)."""
    E = offsets.numel() - 1
    expert_of_sorted = torch.repeat_interleave(torch.arange(E, device=order.device), offsets.diff())
    expert = torch.empty_like(expert_of_sorted)
    expert[order.long()] = expert_of_sorted
    return expert


def ref_lora_weight_grad(z, x, order, offsets, coef, dropout_p, seed, stream):
    acc = acc_dtype(x.dtype)
    T, k, R = z.shape
    D = x.shape[1]
    E = offsets.numel() - 1
    x_drop = x.to(acc)[:, None, :] * dropout_scale(x, seed, stream, T, k, D, dropout_p, acc)  # [T, k, D]
    cz = z if coef is None else coef[..., None] * z  # [T, k, R]
    expert = pair_experts(order, offsets)  # [N]
    out = torch.zeros(E, R, D, dtype=acc, device=x.device)
    out.index_add_(0, expert, (cz[..., None] * x_drop[:, :, None, :]).reshape(T * k, R, D))
    return out


# --- fused expert SwiGLU and combine -----------------------------------------------------
def _operand(t, dtype):
    """t (acc) rounded to the activations' dtype and back: a rank-r product's operand
    (docs/design.md: zg, zu and drop(h) enter their products in G's dtype). Under autograd the
    gradient passing back through it is rounded the same way."""
    return t.to(dtype).to(t.dtype)


def _swiglu_pairs(G, U, ids, zg, Bg, zu, Bu, scale, activation, operand_dtype):
    """g, u, h of every pair: [T, k, I] each, in acc; zg, zu rounded to operand_dtype (the
    activations' dtype: G's, or the op's G where G here is an upcast leaf)."""
    acc = acc_dtype(G.dtype)
    k = ids.shape[1]
    e = ids.long()
    g = G.to(acc)[:, None, :].expand(-1, k, -1)
    u = U.to(acc)[:, None, :].expand(-1, k, -1)
    if Bg is not None:
        g = g + scale * torch.einsum("tkir,tkr->tki", Bg.to(acc)[e], _operand(zg, operand_dtype))
    if Bu is not None:
        u = u + scale * torch.einsum("tkir,tkr->tki", Bu.to(acc)[e], _operand(zu, operand_dtype))
    return g, u, ACTIVATIONS[activation](g) * u


def ref_moe_swiglu(G, U, ids, weights, zg, Bg, zu, Bu, Ad, scale, activation, dropout_p, seed):
    acc = acc_dtype(G.dtype)
    T, I = G.shape
    k = ids.shape[1]
    _, _, h = _swiglu_pairs(G, U, ids, zg, Bg, zu, Bu, scale, activation, G.dtype)  # [T, k, I]
    hbar = (weights[..., None] * h).sum(1).to(G.dtype)
    if Ad is None:
        return hbar, torch.empty(0, dtype=acc, device=G.device)
    h_drop = _operand(h * dropout_scale(G, seed, 2, T, k, I, dropout_p, acc), G.dtype)
    zd = torch.einsum("tkri,tki->tkr", Ad.to(acc)[ids.long()], h_drop)
    return hbar, zd


def ref_moe_swiglu_backward(grad_hbar, grad_zd, G, U, ids, weights, zg, Bg, zu, Bu, Ad, order,
                            offsets, scale, activation, dropout_p, seed):
    """Autograd through the forward reference (independent of design.md's backward formulas).

    order and offsets only fix the kernels' summation order, so they are unused here.
    """
    acc = acc_dtype(G.dtype)
    T, I = G.shape
    k = ids.shape[1]
    names = ["G", "U", "weights", "zg", "zu", "Bg", "Bu", "Ad"]  # the op's output order
    given = dict(G=G, U=U, weights=weights, zg=zg, Bg=Bg, zu=zu, Bu=Bu, Ad=Ad)
    leaves = {n: t.detach().to(acc).requires_grad_() for n, t in given.items() if t is not None}
    with torch.enable_grad():
        g, u, h = _swiglu_pairs(leaves["G"], leaves["U"], ids, leaves.get("zg"), leaves.get("Bg"),
                                leaves.get("zu"), leaves.get("Bu"), scale, activation, G.dtype)
        hbar = (leaves["weights"][..., None] * h).sum(1)
        loss = (grad_hbar.to(acc) * hbar).sum()
        if Ad is not None and grad_zd is not None:
            h_drop = _operand(h * dropout_scale(G, seed, 2, T, k, I, dropout_p, acc), G.dtype)
            zd = torch.einsum("tkri,tki->tkr", leaves["Ad"][ids.long()], h_drop)
            loss = loss + (grad_zd * zd).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
    grads = {n: torch.zeros_like(leaves[n]) if gr is None else gr for n, gr in zip(leaves, grads)}
    # Activation-shaped and weight gradients in the activation dtype, pair gradients in acc.
    out_dtype = dict(G=G.dtype, U=G.dtype, weights=acc, zg=acc, zu=acc, Bg=G.dtype, Bu=G.dtype,
                     Ad=G.dtype)
    empty = torch.empty(0, device=G.device)
    return tuple(grads[n].to(out_dtype[n]) if n in grads else empty.to(out_dtype[n]) for n in names)
