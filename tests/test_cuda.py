"""CUDA kernels of every torch.ops.mixlora op on the GPU, against tests/op_reference.py.

Accuracy is judged flash-attention style: for each output, the kernel's max error against the
reference run in float64 (on the same inputs, upcast) is at most twice the error of the same
reference run in the test dtype, plus a few ulps of the output dtype. Integer outputs must be
equal. Fresh random inputs every test; odd sizes (widths that are and are not multiples of the
16-byte vector), T up to 4097, E up to 64, k up to 4, ranks 1 to 64, plus the SPEC shape with
few tokens. Freed device memory is poisoned (NaN / -1 bytes) before every op call, so an output
element the kernel never writes shows up as NaN or -1.

Also: bitwise determinism of every op and of the layer, skewed routing (empty experts), T = 0,
GPU vs CPU dropout masks, misaligned inputs, MixLoRAFFN against the authors' algorithm on the
GPU, and CUDA-graph capture of the layer's forward + backward.

`-k small` selects one quick test of every op and the layer, for compute-sanitizer.

Legend: T tokens, E experts, k slots, N = T*k pairs, R rank, D feature width (H or I).
"""
import os

import pytest
import torch

import mixlora_ext  # noqa: F401  (registers torch.ops.mixlora)
import op_reference as ref
from op_inputs import OP_VARIANTS, SEED, SWIGLU_VARIANTS, OpInputs
import test_layer
from conftest import HAS_CUDA, lora_params, make_layer
from mixlora_ext import reference_forward

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of mixlora_ext")]

ops = torch.ops.mixlora
DEV = "cuda"
DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
# Output ulps allowed on top of 2x the reference's own error.
FLOOR = {torch.float64: 1e-11, torch.float32: 1e-5, torch.bfloat16: 2 * 2.0**-8,
         torch.float16: 2 * 2.0**-11}

# (T, E, k, R, D). D = 203 and 2051 are not multiples of 8 (element-wise path); 2051 also spans
# two column tiles of the fused SwiGLU.
CASES = [
    (1, 1, 1, 1, 200),
    (7, 4, 2, 8, 1000),
    (7, 64, 4, 16, 203),
    (1000, 8, 2, 16, 200),
    (1000, 16, 4, 64, 1000),
    (1000, 16, 2, 16, 1000),  # E = 16, r = 16: the tensor-core SwiGLU forward (bf16)
    (33, 4, 4, 8, 2051),
    (4097, 8, 2, 16, 1000),
    (4097, 64, 1, 1, 200),
]
SPEC_CASES = [(7, 8, 2, 16, 4096), (7, 8, 2, 16, 11008)]  # D = H and D = I of the SPEC shape
# (520, 4, 2, 8, 200): 1040 pairs, enough for the bf16 tensor-core SwiGLU and shrink kernels.
SMALL_CASES = [(7, 4, 2, 8, 200), (5, 4, 2, 8, 203), (520, 4, 2, 8, 200)]


def case_id(case):
    return "T{}-E{}-k{}-R{}-D{}".format(*case)


# --- inputs (tests/op_inputs.py, shared with the CPU tests) -------------------------------
INPUTS = OpInputs(DEV)
randn, rand_ids = INPUTS.randn, INPUTS.rand_ids


# Ops whose D is the intermediate size (SPEC I); the others take the hidden size (SPEC H).
TAKES_I = ("moe_swiglu", "moe_swiglu_backward")
# topk_gating_backward takes acc tensors only; sort_pairs takes no floating tensor.
ACC_ONLY = ("topk_gating_backward",)


def make_args(name, case, dtype, variant, **kwargs):
    if name in ACC_ONLY:
        dtype = ref.acc_dtype(dtype)
    return INPUTS.build(name, case, dtype, variant, **kwargs)


# --- running and checking ------------------------------------------------------------------
def poison_free_memory():
    """Fill the caching allocator's free memory with 0xFF bytes (NaN in every float dtype, -1 in
    the integer ones), so that outputs allocated from it and left unwritten are caught. (Nothing
    to do without the caching allocator, as under compute-sanitizer.)"""
    if os.environ.get("PYTORCH_NO_CUDA_MEMORY_CACHING") == "1":
        return
    torch.cuda.synchronize()
    blocks = [torch.empty(n, dtype=torch.uint8, device=DEV) for n in [2**28] + [2**20] * 16 + [2**12] * 64]
    for b in blocks:
        b.fill_(0xFF)
    del blocks


def run_op(name, args):
    poison_free_memory()
    out = getattr(ops, name)(*args)
    return out if isinstance(out, tuple) else (out,)


def upcast(args):
    return tuple(a.double() if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                 for a in args)


def reference(name, args):
    out = getattr(ref, "ref_" + name)(*args)
    return out if isinstance(out, tuple) else (out,)


def assert_accurate(name, args, ref_args=None):
    """The op's outputs against the float64 reference, with the tolerance of the module doc.
    ref_args: the same values for the references, when args has layouts they do not take."""
    got = run_op(name, args)
    ref_args = args if ref_args is None else ref_args
    same_precision = reference(name, ref_args)
    exact = reference(name, upcast(ref_args))
    assert len(got) == len(same_precision)
    for i, (o, lo, ex) in enumerate(zip(got, same_precision, exact)):
        assert (o.dtype, o.shape, o.device) == (lo.dtype, lo.shape, lo.device), f"{name} output {i}"
        if not o.is_floating_point():
            assert torch.equal(o, lo.to(o.dtype)), f"{name} output {i}"
            continue
        assert not torch.isnan(o).any(), f"{name} output {i}: NaN (an element left unwritten?)"
        if o.numel() == 0:
            continue
        o64, ex64 = o.double(), ex.double()
        err = (o64 - ex64).abs().max().item()
        ref_err = (lo.double() - ex64).abs().max().item()
        floor = FLOOR[o.dtype] * ex64.abs().max().item()
        assert err <= 2 * ref_err + floor, f"{name} output {i}: err {err} ref_err {ref_err} floor {floor}"


# --- every op against the reference --------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_matches_reference(name, variant, case, dtype):
    if name == "sort_pairs" and dtype != torch.float32:
        pytest.skip("sort_pairs has no floating input")
    assert_accurate(name, make_args(name, case, dtype, variant))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name,variant", [(n, v) for n, v in OP_VARIANTS
                                          if n not in ("topk_gating", "topk_gating_backward", "sort_pairs")])
def test_spec_shape(name, variant, dtype):
    case = SPEC_CASES[1] if name in TAKES_I else SPEC_CASES[0]
    assert_accurate(name, make_args(name, case, dtype, variant))


@pytest.mark.parametrize("case", SMALL_CASES, ids=case_id)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_small_every_op(dtype, case):
    """One quick pass over every op and variant (for compute-sanitizer: `-k small`)."""
    for name, variant in OP_VARIANTS:
        assert_accurate(name, make_args(name, case, dtype, variant))


# --- determinism ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_bitwise_deterministic(name, variant, dtype):
    assert_deterministic(name, make_args(
        name, (1000, 16, 4, 64, 2051) if name in TAKES_I else (4097, 8, 2, 16, 1000), dtype, variant))


def assert_deterministic(name, args):
    first, second = run_op(name, args), run_op(name, args)
    for a, b in zip(first, second):
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)


@pytest.mark.parametrize("variant", range(len(SWIGLU_VARIANTS)))
@pytest.mark.parametrize("name", TAKES_I)
@pytest.mark.parametrize("case", [(4097, 8, 2, 16, 1544), (600, 8, 2, 64, 1032)], ids=case_id)
def test_bitwise_deterministic_tensor_cores(name, variant, case):
    """The bfloat16 SwiGLU ops at shapes the tensor-core kernels take (I % 8 == 0): r = 16,
    E = 8 over several column tiles (one of 8 columns) and token groups; r = 64, E = 8, whose
    backward pass 1 has one shared-memory stage on an H100 (two do not fit)."""
    assert_deterministic(name, make_args(name, case, torch.bfloat16, variant))


@pytest.mark.parametrize("variant", range(len(SWIGLU_VARIANTS)))
@pytest.mark.parametrize("case", [
    (1000, 8, 2, 32, 1000), (600, 4, 2, 24, 1032), (300, 4, 2, 5, 520),
    (600, 4, 2, 64, 1032), (600, 4, 2, 48, 1032), (600, 4, 2, 40, 1032), (2500, 2, 2, 64, 4096),
    (600, 8, 2, 64, 1032), (600, 8, 2, 32, 1032)],
                         ids=case_id)
def test_swiglu_backward_tensor_core_ranks(case, variant):
    """The bfloat16 tensor-core weight gradients (swiglu_wgrad_mma_kernels.cu) at ranks other
    than 16: 32 (two k-steps), 24 and 5 (zero-padded to the MMA's 16 or 32), 64 and 48 (four and
    three k-steps), 40 (zero-padded to 48); I of 1032 keeps the split z terms within the
    workspace limit at these ranks, and (2500, 2, 2, 64, 4096) takes two pair splits (partials).
    Pass 1 (swiglu_mma_kernels.cu) takes the ranks 32 and 64 here: with two shared-memory
    stages at (2500, 2, 2, 64, 4096) and (600, 8, 2, 32, 1032), with one (two do not fit on an
    H100) at (600, 4, 2, 64, 1032) and (600, 8, 2, 64, 1032)."""
    assert_accurate("moe_swiglu_backward",
                    make_args("moe_swiglu_backward", case, torch.bfloat16, variant))


@pytest.mark.parametrize("offset", [0, 1], ids=["aligned", "offset"])
def test_lora_shrink_dense_with_dropout(offset):
    """bf16 lora_shrink with dropout and >= 256 pairs takes the masked-rows GEMM (lora_cuda.cpp);
    x at a 2-byte storage offset (contiguous, not 16-byte aligned) takes its scalar copy."""
    T, E, k, R, D = 300, 8, 2, 16, 1032
    x, A, ids, p, seed, stream = make_args("lora_shrink", (T, E, k, R, D), torch.bfloat16, 1)
    flat = torch.empty(T * D + offset, dtype=torch.bfloat16, device=DEV)
    flat[offset:].copy_(x.reshape(-1))
    x = flat[offset:].view(T, D)
    assert p > 0 and x.is_contiguous()
    assert_accurate("lora_shrink", (x, A, ids, p, seed, stream))


@pytest.mark.parametrize("with_coef", [False, True], ids=["no_coef", "coef"])
@pytest.mark.parametrize("T,E,k,R", [(300, 8, 2, 32), (1000, 16, 4, 64)])
def test_lora_weight_grad_dense(T, E, k, R, with_coef):
    """bf16 lora_weight_grad without dropout and >= 256 tokens takes the GEMM over the split
    hi + lo of (coef *) z (lora_cuda.cpp), with a coef as the down LoRA's dB takes it (the op's
    variants pair a coef with dropout, which keeps the kernel), and bitwise the same twice."""
    z, x, order, offsets, _, _, seed, stream = make_args("lora_weight_grad", (T, E, k, R, 1032),
                                                         torch.bfloat16, 0)
    coef = randn(T, k, dtype=torch.float32) if with_coef else None
    args = (z, x, order, offsets, coef, 0.0, seed, stream)
    assert_accurate("lora_weight_grad", args)
    assert torch.equal(run_op("lora_weight_grad", args)[0], run_op("lora_weight_grad", args)[0])


# --- routing extremes ----------------------------------------------------------------------
def skewed_ids(T, E, k):
    """Every token on the same k experts (k + 1 .. E - 1 and 0 empty)."""
    return (torch.arange(k, dtype=torch.int32, device=DEV) + 1).expand(T, k).contiguous()


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name,variant", [(n, v) for n, v in OP_VARIANTS if n in (
    "lora_shrink", "lora_expand", "lora_weight_grad", "moe_swiglu", "moe_swiglu_backward")])
@pytest.mark.parametrize("T,E,k", [(4097, 8, 1), (1000, 8, 2)])
def test_skewed_routing(name, variant, dtype, T, E, k):
    assert_accurate(name, make_args(name, (T, E, k, 16, 1000), dtype, variant, ids=skewed_ids(T, E, k)))


def test_sort_pairs_skewed_and_empty_experts():
    for ids, E in ((skewed_ids(4097, 8, 2), 8), (torch.zeros(999, 1, dtype=torch.int32, device=DEV), 64),
                   (rand_ids(3000, 4, 4), 4), (rand_ids(1, 1, 1), 1)):
        assert_accurate("sort_pairs", (ids, E))


@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_zero_tokens(name, variant):
    args = make_args(name, (0, 4, 2, 8, 200), torch.float32, variant)
    got, want = run_op(name, args), reference(name, args)
    for o, w in zip(got, want):
        assert (o.dtype, o.shape) == (w.dtype, w.shape)
        assert torch.equal(o, w.to(o.dtype))  # empty, or zeros (offsets, weight gradients)


# --- dropout masks -------------------------------------------------------------------------
@pytest.mark.parametrize("seed,stream,rows,cols,p", [
    (0, 0, 1, 1, 0.5), (SEED, 2, 4097 * 2, 1000, 0.1), (-5, 1, 33, 203, 0.9),
    (2**62, 7, 8192, 11008, 0.05), (123, 0, 7, 5, 0.0), (1, 1, 0, 9, 0.3),
])
def test_dropout_mask_gpu_equals_cpu(seed, stream, rows, cols, p):
    gpu = ops.dropout_mask(torch.empty(0, device=DEV), seed, stream, rows, cols, p)
    cpu = ops.dropout_mask(torch.empty(0), seed, stream, rows, cols, p)
    assert gpu.device.type == "cuda" and gpu.dtype == torch.bool and gpu.shape == (rows, cols)
    assert torch.equal(gpu.cpu(), cpu)


# --- layouts the glue must handle -----------------------------------------------------------
def misaligned(t):
    """The same values, contiguous, but starting 1 element past a 16-byte boundary."""
    flat = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    out = flat[1:].view(t.shape)
    out.copy_(t)
    return out


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
@pytest.mark.parametrize("name,variant", OP_VARIANTS)
def test_misaligned_and_strided_inputs(name, variant, dtype):
    args = make_args(name, (33, 8, 2, 8, 1000), dtype, variant)
    moved = tuple(misaligned(a) if isinstance(a, torch.Tensor) and a.dim() >= 2 else a for a in args)
    assert_accurate(name, moved, ref_args=args)
    strided = tuple(a.t().contiguous().t() if isinstance(a, torch.Tensor) and a.dim() == 2 else a
                    for a in args)
    assert_accurate(name, strided, ref_args=args)


# --- the layer -----------------------------------------------------------------------------
@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (8, 2), (16, 4)])
@pytest.mark.parametrize("targets", [("gate_proj", "up_proj", "down_proj"), ("up_proj", "down_proj"),
                                     ("gate_proj",)])
def test_layer_matches_reference_float64(num_experts, top_k, targets):
    layer = make_layer(hidden=72, inter=200, num_experts=num_experts, top_k=top_k, r=8,
                       device=DEV, targets=targets)
    test_layer._compare(layer, torch.randn(33, 72, dtype=torch.float64, device=DEV),
                        atol=1e-10, rtol=1e-9)


def test_layer_dropout_uses_kernel_masks():
    layer = make_layer(hidden=72, inter=200, num_experts=8, top_k=2, r=8, device=DEV,
                       lora_dropout=0.3).train()
    x = torch.randn(33, 72, dtype=torch.float64, device=DEV, requires_grad=True)
    out = layer(x)
    want = reference_forward(layer, x, dropout_seed=layer.last_dropout_seed)
    torch.testing.assert_close(out, want, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(out)
    params = [x, *lora_params(layer).values()]
    for a, b in zip(torch.autograd.grad(out, params, g), torch.autograd.grad(want, params, g)):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_layer_low_precision(dtype):
    """Output and every gradient within 2x the reference's own error in that dtype."""
    layer = make_layer(hidden=264, inter=1000, num_experts=8, top_k=2, r=16, dtype=torch.float32,
                       device=DEV)
    layer.base_layer.to(dtype)
    x = torch.randn(257, 264, dtype=dtype, device=DEV)
    cotangent = torch.randn(257, 264, dtype=dtype, device=DEV)

    def forward_backward(fn, layer, x):
        for p in layer.parameters():
            p.grad = None
        x = x.detach().clone().requires_grad_(True)
        out = fn(layer, x)
        out.backward(cotangent.to(out.dtype))
        return [out.detach(), x.grad] + [p.grad for p in lora_params(layer).values()]

    got = forward_backward(lambda m, v: m(v), layer, x)
    same_precision = forward_backward(reference_forward, layer, x)
    layer.double()
    exact = forward_backward(reference_forward, layer, x.double())
    names = ["out", "x"] + list(lora_params(layer))
    for name, o, lo, ex in zip(names, got, same_precision, exact):
        assert o is not None and not torch.isnan(o).any(), name
        err = (o.double() - ex).abs().max().item()
        ref_err = (lo.double() - ex).abs().max().item()
        assert err <= 2 * ref_err + 1e-2 * ex.abs().max().item(), (name, err, ref_err)


def _layer_step(layer, x, cotangent):
    """Forward + backward; returns the output and every gradient."""
    out = layer(x)
    out.backward(cotangent)
    return [out, x.grad] + [p.grad for p in lora_params(layer).values()]


def _zero_grads(layer, x):
    x.grad = None
    for p in layer.parameters():
        p.grad = None


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_layer_forward_backward_bitwise_deterministic(dtype):
    layer = make_layer(hidden=520, inter=1000, num_experts=8, top_k=2, r=16, dtype=torch.float32,
                       device=DEV)
    layer.base_layer.to(dtype)
    x = torch.randn(1000, 520, dtype=dtype, device=DEV, requires_grad=True)
    cotangent = torch.randn(1000, 520, dtype=dtype, device=DEV)
    runs = []
    for _ in range(2):
        _zero_grads(layer, x)
        runs.append([t.clone() for t in _layer_step(layer, x, cotangent)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_layer_cuda_graph_capture(dtype):
    """Forward + backward captured in a CUDA graph (no host sync anywhere) replays to exactly
    what eager execution gives, on new inputs written into the static ones."""
    layer = make_layer(hidden=264, inter=1000, num_experts=8, top_k=2, r=16, dtype=torch.float32,
                       device=DEV)
    layer.base_layer.to(dtype)
    static_x = torch.randn(129, 264, dtype=dtype, device=DEV, requires_grad=True)
    static_cotangent = torch.randn(129, 264, dtype=dtype, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture stream, as torch.cuda.graphs asks
        for _ in range(2):
            _zero_grads(layer, static_x)
            _layer_step(layer, static_x, static_cotangent)
    torch.cuda.current_stream().wait_stream(side)
    # last_probs keeps the warm-up's autograd graph (and its AccumulateGrad nodes, bound to the
    # side stream) alive; drop it so that the captured backward accumulates on its own stream.
    layer.last_probs = layer.last_ids = None
    _zero_grads(layer, static_x)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_outputs = _layer_step(layer, static_x, static_cotangent)

    x, cotangent = torch.randn_like(static_x), torch.randn_like(static_cotangent)
    with torch.no_grad():
        static_x.copy_(x)
        static_cotangent.copy_(cotangent)
    graph.replay()
    torch.cuda.synchronize()
    replayed = [t.clone() for t in static_outputs]

    eager_x = x.clone().requires_grad_(True)
    for p in layer.parameters():
        p.grad = None
    eager = _layer_step(layer, eager_x, cotangent)
    for a, b in zip(replayed, eager):
        assert torch.equal(a, b)


def test_device_mismatch_is_a_clear_error():
    logits = torch.randn(5, 4, device=DEV)
    _, ids, _ = torch.ops.mixlora.topk_gating(logits, 2)
    x = torch.randn(5, 16, device=DEV)
    A_cpu = torch.randn(4, 3, 16)
    with pytest.raises(RuntimeError, match="A is on cpu but the other inputs are on cuda"):
        torch.ops.mixlora.lora_shrink(x, A_cpu, ids, 0.0, 0, 0)
    G = torch.randn(5, 8, device=DEV)
    with pytest.raises(RuntimeError, match="is on cpu but the other inputs are on cuda"):
        torch.ops.mixlora.moe_swiglu(G, G.cpu(), ids, torch.rand(5, 2, device=DEV), None, None,
                                     None, None, None, 1.0, 0, 0.0, 0)
