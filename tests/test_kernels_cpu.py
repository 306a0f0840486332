"""CPU kernels of every torch.ops.mixlora op against the references in tests/op_reference.py.

Fresh random inputs on every run; odd sizes, T = 0, absent optional tensors, dropout on and
off, every activation; float64 at tight tolerance, float32/bfloat16/float16 at loose ones;
non-contiguous inputs; determinism across thread counts; opcheck; clear errors on bad inputs.
"""
import importlib.util
import itertools
import struct

import pytest
import torch

import mixlora_ext  # registers torch.ops.mixlora
import op_reference as ref
from op_inputs import FLOAT_OP_VARIANTS, OP_VARIANTS, SEED, OpInputs

# The fake kernels and autograd formulas live in mixlora_ext.ops: with them opcheck runs in full.
HAS_OPS_MODULE = importlib.util.find_spec("mixlora_ext.ops") is not None
if HAS_OPS_MODULE:
    import mixlora_ext.ops  # noqa: F401

ops = torch.ops.mixlora

# (T, E, k, R, D): T in {0, 1, 7, 33}, every (E, k) with k in {1, 2, E}, (R, D) in turn.
EXPERTS_K = ((1, 1), (3, 1), (3, 2), (3, 3), (8, 1), (8, 2), (8, 8))
RANK_WIDTH = ((1, 5), (4, 17), (4, 5), (1, 17))
CASES = [(T, E, k) + RANK_WIDTH[i % len(RANK_WIDTH)]
         for i, (T, (E, k)) in enumerate(itertools.product((0, 1, 7, 33), EXPERTS_K))]
LOOSE_CASES = [(33, 8, 2, 4, 17), (7, 3, 3, 1, 5), (0, 3, 2, 4, 5)]
MID_CASE = (33, 8, 2, 4, 17)
TOL = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-3}


# --- inputs (tests/op_inputs.py, shared with the CUDA tests) ------------------------------
INPUTS = OpInputs("cpu")
randn = INPUTS.randn


def make_args(name, case, dtype, variant):
    return INPUTS.build(name, case, dtype, variant)


def as_tuple(out):
    return out if isinstance(out, tuple) else (out,)


def assert_matches(out, expected, dtype):
    out, expected = as_tuple(out), as_tuple(expected)
    assert len(out) == len(expected)
    for i, (o, e) in enumerate(zip(out, expected)):
        assert (o.dtype, o.shape) == (e.dtype, e.shape), f"output {i}"
        if o.is_floating_point():
            tol = TOL[dtype]
            torch.testing.assert_close(o.double(), e.double(), rtol=tol, atol=tol, msg=lambda m: f"output {i}: {m}")
        else:
            assert torch.equal(o, e), f"output {i}"


def assert_identical(a, b):
    a, b = as_tuple(a), as_tuple(b)
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


def non_contiguous(t):
    """The same values in a tensor whose last dimension has stride 2."""
    if not isinstance(t, torch.Tensor):
        return t
    wide = torch.zeros(*t.shape, 2, dtype=t.dtype)
    wide[..., 0] = t
    out = wide[..., 0]
    assert not out.is_contiguous() or t.numel() <= 1
    return out


# --- against the reference -----------------------------------------------------------------
@pytest.mark.parametrize("case", CASES, ids=lambda c: "T{}-E{}-k{}-R{}-D{}".format(*c))
@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_float64_matches_reference(name, variant, case):
    args = make_args(name, case, torch.float64, variant)
    assert_matches(getattr(ops, name)(*args), getattr(ref, "ref_" + name)(*args), torch.float64)


@pytest.mark.parametrize("case", LOOSE_CASES, ids=lambda c: "T{}-E{}-k{}-R{}-D{}".format(*c))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("name,variant", FLOAT_OP_VARIANTS)
def test_low_precision_matches_reference(name, variant, dtype, case):
    args = make_args(name, case, dtype, variant)
    # topk_gating_backward takes only acc tensors: its low-precision case is float32.
    tol_dtype = torch.float32 if name == "topk_gating_backward" else dtype
    assert_matches(getattr(ops, name)(*args), getattr(ref, "ref_" + name)(*args), tol_dtype)


def test_topk_gating_backward_is_the_gradient_of_topk_gating():
    logits = torch.randn(33, 8, dtype=torch.float64, requires_grad=True)
    weights, ids, probs = ref.ref_topk_gating(logits, 3)
    grad_weights, grad_probs = torch.randn_like(weights), torch.randn_like(probs)
    (expected,) = torch.autograd.grad((weights * grad_weights).sum() + (probs * grad_probs).sum(), logits)
    out = ops.topk_gating_backward(grad_weights, grad_probs, weights.detach(), ids, probs.detach())
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-12)


# --- gating tie-breaking -------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_topk_gating_ties_go_to_the_lower_expert(dtype):
    logits = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0],
                           [0.5, 0.5, 0.5, 0.5, 0.5],
                           [3.0, -1.0, 3.0, 3.0, -1.0]], dtype=dtype)
    weights, ids, _ = ops.topk_gating(logits, 4)
    assert ids.tolist() == [[1, 2, 4, 0], [0, 1, 2, 3], [0, 2, 3, 1]]
    assert torch.equal(weights[1], torch.full((4,), 0.25, dtype=weights.dtype))


# --- dropout mask --------------------------------------------------------------------------
MASK64 = (1 << 64) - 1


def splitmix64(z):
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def python_keep(seed, stream, index, p):
    """csrc/common/dropout_rng.h in plain Python: 24-bit uniform >= p, compared in float32."""
    key = splitmix64((seed & MASK64) ^ splitmix64(stream & MASK64))
    uniform = (splitmix64((key + index) & MASK64) >> 40) / 16777216.0  # exact in float32
    p32 = struct.unpack("f", struct.pack("f", p))[0]
    return uniform >= p32


@pytest.mark.parametrize("seed,stream", [(0, 0), (1234, 1), (-5, 2), (2**40 + 7, 0)])
def test_dropout_mask_matches_splitmix64(seed, stream):
    rows, cols, p = 3, 7, 0.3
    mask = ops.dropout_mask(torch.empty(0), seed, stream, rows, cols, p)
    assert mask.dtype == torch.bool and mask.shape == (rows, cols)
    expected = [[python_keep(seed, stream, r * cols + c, p) for c in range(cols)] for r in range(rows)]
    assert mask.tolist() == expected


def test_dropout_mask_rate_and_edges():
    mask = ops.dropout_mask(torch.empty(0), SEED, 0, 200, 500, 0.25)
    assert abs(mask.double().mean().item() - 0.75) < 0.01
    assert ops.dropout_mask(torch.empty(0), SEED, 0, 4, 9, 0.0).all()
    assert ops.dropout_mask(torch.empty(0), SEED, 0, 0, 9, 0.5).shape == (0, 9)
    # Streams are independent masks.
    assert not torch.equal(ops.dropout_mask(torch.empty(0), SEED, 0, 8, 64, 0.5),
                           ops.dropout_mask(torch.empty(0), SEED, 1, 8, 64, 0.5))


# --- layouts and threads -------------------------------------------------------------------
@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_non_contiguous_inputs_give_identical_results(name, variant):
    args = make_args(name, MID_CASE, torch.float32, variant)
    strided = [non_contiguous(a) for a in args]
    assert_identical(getattr(ops, name)(*strided), getattr(ops, name)(*args))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_bitwise_identical_across_thread_counts(name, variant, dtype):
    args = make_args(name, MID_CASE, dtype, variant)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(getattr(ops, name)(*args))
    finally:
        torch.set_num_threads(threads)
    for out in outs[1:]:
        assert_identical(out, outs[0])


# --- opcheck -------------------------------------------------------------------------------
# Without mixlora_ext.ops (fake kernels), only the checks that need no fake kernel can run.
OPCHECK_UTILS = (None if HAS_OPS_MODULE else ("test_schema", "test_autograd_registration"))


@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_opcheck(name, variant):
    args = make_args(name, (7, 3, 2, 4, 5), torch.float32, variant)
    kwargs = {} if OPCHECK_UTILS is None else {"test_utils": OPCHECK_UTILS}
    torch.library.opcheck(getattr(ops, name).default, args, **kwargs)


def test_opcheck_dropout_mask():
    kwargs = {} if OPCHECK_UTILS is None else {"test_utils": OPCHECK_UTILS}
    torch.library.opcheck(ops.dropout_mask.default, (torch.empty(0), SEED, 1, 5, 7, 0.3), **kwargs)


# --- bad inputs ----------------------------------------------------------------------------
def out_of_range(t):
    """An index tensor with one entry past the largest valid value."""
    t = t.clone()
    t.view(-1)[0] = 1000
    return t


# (op, variant, {argument: new value or function of the valid value}, expected message)
BAD_INPUTS = [
    ("router_logits", 0, dict(x=torch.randn(4)), r"x must be 2-D"),
    ("router_logits", 0, dict(weight=lambda t: t.float()), r"weight must be Double"),
    ("router_logits", 0, dict(weight=lambda t: t[:, :1]), r"weight must have shape"),
    ("router_logits_backward", 0, dict(grad=lambda t: t[:1]), r"grad must have shape"),
    ("topk_gating", 0, dict(logits=torch.randn(4)), r"logits must be 2-D"),
    ("topk_gating", 0, dict(logits=lambda t: t.int()), r"logits must be a floating tensor"),
    ("topk_gating", 0, dict(logits=torch.randn(4, 0)), r"logits must have E >= 1"),
    ("topk_gating", 0, dict(k=4), r"k must be in \[1, E = 3\], got 4"),
    ("topk_gating", 0, dict(k=0), r"k must be in \[1, E = 3\], got 0"),
    ("topk_gating_backward", 1, dict(probs=lambda t: t.half()), r"probs must be float32 or float64"),
    ("topk_gating_backward", 1, dict(ids=lambda t: t.long()), r"ids must be Int"),
    ("topk_gating_backward", 1, dict(ids=out_of_range), r"ids must hold values in \[0, 3\)"),
    ("topk_gating_backward", 1, dict(weights=lambda t: t[:, :1]), r"weights must have shape \[7, 2\]"),
    ("topk_gating_backward", 1, dict(grad_probs=lambda t: t.float()), r"grad_probs must be Double"),
    ("sort_pairs", 0, dict(ids=lambda t: t.float()), r"ids must be Int"),
    ("sort_pairs", 0, dict(ids=lambda t: t.view(-1)), r"ids must be 2-D"),
    ("sort_pairs", 0, dict(num_experts=0), r"num_experts must be >= 1"),
    ("sort_pairs", 0, dict(ids=out_of_range), r"ids must hold values in \[0, 3\)"),
    ("sort_pairs", 0, dict(ids=lambda t: t - 1 - t.max()), r"ids must hold values in \[0, 3\)"),
    ("gather_pairs", 1, dict(order=lambda t: t[1:]), r"order must have shape \[14\]"),
    ("gather_pairs", 1, dict(order=out_of_range), r"order must hold values in \[0, 14\)"),
    ("gather_pairs", 1, dict(weights=lambda t: t.float()), r"weights must be Double"),
    ("gather_pairs", 1, dict(k=0), r"k must be >= 1"),
    ("scatter_pairs", 1, dict(k=3), r"multiple of k = 3"),
    ("scatter_pairs", 1, dict(position=lambda t: t.long()), r"position must be Int"),
    ("scatter_pairs", 1, dict(position=out_of_range), r"position must hold values in \[0, 14\)"),
    ("pair_dot", 0, dict(paired=lambda t: t.float()), r"paired must be Double"),
    ("pair_dot", 0, dict(paired=lambda t: t[:, 1:]), r"paired must have shape \[14, 5\]"),
    ("lora_shrink", 1, dict(A=lambda t: t.float()), r"A must be Double"),
    ("lora_shrink", 1, dict(A=lambda t: t[:, :, 1:]), r"A.size\(2\) must be 5"),
    ("lora_shrink", 1, dict(A=lambda t: t[:, :0]), r"A.size\(1\) \(R\) must be >= 1"),
    ("lora_shrink", 1, dict(A=lambda t: t[:0]), r"A.size\(0\) \(E\) must be >= 1"),
    ("lora_shrink", 1, dict(ids=out_of_range), r"ids must hold values in \[0, 3\)"),
    ("lora_shrink", 1, dict(ids=lambda t: t[:1]), r"ids.size\(0\) must be 7"),
    ("lora_shrink", 1, dict(dropout_p=1.0), r"dropout_p must be in \[0, 1\)"),
    ("lora_expand", 1, dict(z=lambda t: t.float()), r"z must be Double"),
    ("lora_expand", 1, dict(z=lambda t: t[..., 1:]), r"z must have shape \[7, 2, 4\]"),
    ("lora_expand", 1, dict(coef=lambda t: t[:, :1]), r"coef must have shape \[7, 2\]"),
    ("lora_expand", 1, dict(ids=out_of_range), r"ids must hold values in \[0, 3\)"),
    ("lora_weight_grad", 1, dict(offsets=lambda t: t.int()), r"offsets must be Long"),
    ("lora_weight_grad", 1, dict(offsets=lambda t: t[:1]), r"offsets must have E \+ 1 >= 2"),
    ("lora_weight_grad", 1, dict(offsets=lambda t: t.flip(0)), r"offsets must rise from 0 to N = 14"),
    ("lora_weight_grad", 1, dict(order=out_of_range), r"order must hold values in \[0, 14\)"),
    ("lora_weight_grad", 1, dict(z=lambda t: t.float()), r"z must be Double"),
    ("lora_weight_grad", 1, dict(dropout_p=-0.1), r"dropout_p must be in \[0, 1\)"),
    ("moe_swiglu", 0, dict(Bg=None), r"zg and Bg must be given together"),
    ("moe_swiglu", 0, dict(Bu=lambda t: t[:2]), r"Bu.size\(0\) \(E\) must match the other expert weights' E = 3"),
    ("moe_swiglu", 0, dict(Ad=lambda t: t[..., 1:]), r"Ad.size\(2\) must be 5"),
    ("moe_swiglu", 0, dict(activation=4), r"activation must be 0 \(silu\)"),
    ("moe_swiglu", 0, dict(U=lambda t: t[1:]), r"U must have shape \[7, 5\]"),
    ("moe_swiglu", 0, dict(weights=lambda t: t.float()), r"weights must be Double"),
    ("moe_swiglu", 0, dict(ids=out_of_range), r"ids must hold values in \[0, 3\)"),
    ("moe_swiglu_backward", 4, dict(grad_zd=torch.zeros(7, 2, 4, dtype=torch.float64)), r"grad_zd is given but Ad is absent"),
    ("moe_swiglu_backward", 0, dict(offsets=lambda t: t[1:]), r"offsets must have E \+ 1 = 4 entries"),
    ("moe_swiglu_backward", 0, dict(grad_hbar=lambda t: t.float()), r"grad_hbar must be Double"),
    ("moe_swiglu_backward", 0, dict(order=out_of_range), r"order must hold values in \[0, 14\)"),
    ("moe_swiglu_backward", 0, dict(G=lambda t: t.int()), r"G must be a floating tensor"),
]


@pytest.mark.parametrize("name,variant,changes,message", BAD_INPUTS,
                         ids=[f"{n}-{m}" for n, _, _, m in BAD_INPUTS])
def test_bad_inputs_raise_naming_the_argument(name, variant, changes, message):
    args = list(make_args(name, (7, 3, 2, 4, 5), torch.float64, variant))
    names = [a.name for a in getattr(ops, name).default._schema.arguments]
    for arg, change in changes.items():
        i = names.index(arg)
        args[i] = change(args[i]) if callable(change) and not isinstance(change, torch.Tensor) else change
    with pytest.raises(RuntimeError, match=message):
        getattr(ops, name)(*args)


def test_bad_dropout_mask_arguments():
    with pytest.raises(RuntimeError, match=r"rows and cols must be >= 0"):
        ops.dropout_mask(torch.empty(0), SEED, 0, -1, 4, 0.5)
    with pytest.raises(RuntimeError, match=r"dropout_p must be in \[0, 1\)"):
        ops.dropout_mask(torch.empty(0), SEED, 0, 2, 4, 1.5)
