"""Autograd of every differentiable op: float64 gradcheck, and tracing by torch.compile."""
import pytest
import torch

from conftest import make_layer
from mixlora_ext import ops

F64 = dict(dtype=torch.float64)


def _routing(T, E, k):
    logits = torch.randn(T, E, **F64)
    _, ids, _ = ops.topk_gating(logits, k)
    return ids


def _gradcheck(fn, *inputs):
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("T,E,H", [(1, 1, 3), (7, 8, 5), (0, 4, 6)])
def test_router_logits_gradcheck(T, E, H):
    x = torch.randn(T, H, **F64, requires_grad=True)
    weight = torch.randn(E, H, **F64, requires_grad=True)
    _gradcheck(ops.router_logits, x, weight)


@pytest.mark.parametrize("T,E,k", [(5, 1, 1), (7, 4, 2), (6, 8, 3), (4, 5, 5)])
def test_topk_gating_gradcheck_with_aux_path(T, E, k):
    logits = torch.randn(T, E, **F64, requires_grad=True)
    aux_weight = torch.randn(T, E, **F64)

    def fn(lg):
        w, _, p = ops.topk_gating(lg, k)
        return w, (p * aux_weight).sum()  # the aux-loss path reaches the logits through probs

    _gradcheck(fn, logits)


@pytest.mark.parametrize("with_weights", [False, True])
def test_gather_scatter_pair_dot_gradcheck(with_weights):
    T, E, k, D = 6, 4, 2, 5
    ids = _routing(T, E, k)
    order, _, position = ops.sort_pairs(ids, E)
    src = torch.randn(T, D, **F64, requires_grad=True)
    paired = torch.randn(T * k, D, **F64, requires_grad=True)
    w = torch.rand(T, k, **F64, requires_grad=True) if with_weights else None
    _gradcheck(lambda s, *w_: ops.gather_pairs(s, order, k, *w_), src, *([w] if w is not None else []))
    _gradcheck(lambda s, *w_: ops.scatter_pairs(s, position, k, *w_), paired, *([w] if w is not None else []))
    _gradcheck(lambda a, b: ops.pair_dot(a, b, position, k), src, paired)


@pytest.mark.parametrize("dropout_p", [0.0, 0.4])
def test_lora_shrink_expand_gradcheck(dropout_p):
    T, E, k, R, D = 7, 3, 2, 4, 9
    ids = _routing(T, E, k)
    x = torch.randn(T, D, **F64, requires_grad=True)
    A = torch.randn(E, R, D, **F64, requires_grad=True)
    _gradcheck(lambda x_, A_: ops.lora_shrink(x_, A_, ids, dropout_p, 1234, 1), x, A)
    z = torch.randn(T, k, R, **F64, requires_grad=True)
    B = torch.randn(E, D, R, **F64, requires_grad=True)
    coef = torch.rand(T, k, **F64, requires_grad=True)
    _gradcheck(lambda z_, B_, c_: ops.lora_expand(z_, B_, ids, c_, dropout_p, 99, 2), z, B, coef)
    _gradcheck(lambda z_, B_: ops.lora_expand(z_, B_, ids, None, dropout_p, 99, 2), z, B)


@pytest.mark.parametrize("activation", [0, 1, 2])
@pytest.mark.parametrize("dropout_p", [0.0, 0.3])
@pytest.mark.parametrize("present", [(True, True, True), (True, False, True), (False, True, False)])
def test_moe_swiglu_gradcheck(activation, dropout_p, present):
    T, E, k, R, I = 5, 3, 2, 3, 7
    ids = _routing(T, E, k)
    with_g, with_u, with_d = present

    def maybe(flag, *shape):
        return torch.randn(*shape, **F64, requires_grad=True) if flag else None

    G, U = torch.randn(T, I, **F64, requires_grad=True), torch.randn(T, I, **F64, requires_grad=True)
    w = torch.rand(T, k, **F64, requires_grad=True)
    zg, Bg = maybe(with_g, T, k, R), maybe(with_g, E, I, R)
    zu, Bu = maybe(with_u, T, k, R), maybe(with_u, E, I, R)
    Ad = maybe(with_d, E, R, I)
    inputs = [t for t in (G, U, w, zg, Bg, zu, Bu, Ad) if t is not None]

    def fn(*args):
        it = iter(args)
        G_, U_, w_ = next(it), next(it), next(it)
        zg_, Bg_ = (next(it), next(it)) if with_g else (None, None)
        zu_, Bu_ = (next(it), next(it)) if with_u else (None, None)
        Ad_ = next(it) if with_d else None
        hbar, zd = ops.moe_swiglu(G_, U_, ids, w_, zg_, Bg_, zu_, Bu_, Ad_, 0.7, activation, dropout_p, 5)
        return (hbar, zd) if with_d else hbar

    _gradcheck(fn, *inputs)


def test_layer_compiles_fullgraph():
    layer = make_layer(num_experts=4, top_k=2).float()
    x = torch.randn(2, 5, 16, requires_grad=True)
    eager = layer(x)
    compiled = torch.compile(layer, backend="aot_eager", fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert x.grad is not None and layer.router.grad is not None
