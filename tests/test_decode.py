"""expert_ffn's decode path on the GPU (csrc/layer/decode_kernels.cu): a few tokens, no grad.

The layer's no-grad forward on up to 16 tokens takes it; the oracle is the reference
(the authors' algorithm) on the same weights, judged as tests/test_cuda.py does: the error
against the float64 reference is at most twice that of the reference run in the test dtype,
plus a floor of the output dtype. The routing (ids, probs) must match the composed forward's
(the op's composite kernel on the same CUDA tensors). Also: bitwise determinism, CUDA-graph
replay, the fallbacks (more tokens, dropout, too many experts), errors, opcheck. Each under
every way the path can run (MIXLORA_DECODE_FLAGS, csrc/layer/expert_ffn_cuda.cpp: the shrink on
a side stream or not; unset: the default, the side stream).
"""
import copy

import pytest
import torch

import mixlora_ext  # noqa: F401  (registers torch.ops.mixlora)
from conftest import HAS_CUDA, make_layer
from mixlora_ext import reference_forward
from test_cuda import poison_free_memory

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and a CUDA build of mixlora_ext")]

DEV = "cuda"
OP = torch.ops.mixlora.expert_ffn.default
ALL = ("gate_proj", "up_proj", "down_proj")
FLOOR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}

# (T, H, I, E, k, r, targets, bias)
CASES = [
    (1, 72, 200, 8, 2, 16, ALL, False),
    (3, 264, 1000, 8, 2, 16, ALL, True),
    (16, 264, 1000, 16, 4, 8, ALL, False),
    (5, 72, 203, 64, 8, 5, ALL, False),  # odd I and r (scalar loads); E = 64, k = 8: the limits
    (7, 130, 200, 4, 1, 64, ("gate_proj", "down_proj"), False),  # H % 4 != 0
    (2, 72, 200, 8, 2, 3, ("up_proj",), True),
    (4, 72, 200, 1, 1, 4, ("down_proj",), False),
    (9, 72, 200, 8, 2, 16, ("gate_proj", "up_proj"), False),  # no down LoRA
]


# MIXLORA_DECODE_FLAGS: None the default; 0 one stream; 1 the shrink on a side stream.
FLAGS = [None, "0", "1"]


@pytest.fixture(params=FLAGS, ids=lambda f: f"flags-{f or 'default'}")
def decode_flags(request, monkeypatch):
    if request.param is None:
        monkeypatch.delenv("MIXLORA_DECODE_FLAGS", raising=False)
    else:
        monkeypatch.setenv("MIXLORA_DECODE_FLAGS", request.param)
    return request.param


def case_id(case):
    T, H, I, E, k, r, targets, bias = case
    return f"T{T}-H{H}-I{I}-E{E}-k{k}-r{r}-{'+'.join(t[0] for t in targets)}{'-bias' if bias else ''}"


def decode_layer(case, dtype, lora_dtype=torch.float32):
    T, H, I, E, k, r, targets, bias = case
    layer = make_layer(hidden=H, inter=I, num_experts=E, top_k=k, r=r, dtype=torch.float32,
                       device=DEV, targets=targets, bias=bias).eval()
    layer.base_layer.to(dtype)
    for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
        p.data = p.data.to(lora_dtype)
    return layer


def op_args(layer, x):
    base, A, B = layer.base_layer, layer.lora_A, layer.lora_B
    projs = [getattr(base, n) for n in ("gate_proj", "up_proj", "down_proj")]
    lora = []
    for name in ALL:
        lora += [A[name] if name in A else None, B[name] if name in B else None]
    return (x, projs[0].weight, projs[0].bias, projs[1].weight, projs[1].bias, projs[2].weight,
            projs[2].bias, layer.router, *lora, layer.top_k, layer.scaling, layer.activation, 0.0, 0)


def composed(layer, x):
    """The composed forward (expert_ffn's composite kernel, the CPU key's entry) on x's device."""
    with torch.no_grad():
        return OP.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *op_args(layer, x))


def kernel_names(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return {e.name for e in prof.events()}


@pytest.mark.parametrize("lora_dtype", ["float32", "x"])
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=str)
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_matches_reference(case, dtype, lora_dtype, decode_flags):
    if lora_dtype == "x" and dtype == torch.float32:
        pytest.skip("the same as float32 weights")
    layer = decode_layer(case, dtype, torch.float32 if lora_dtype == "float32" else dtype)
    x = torch.randn(case[0], case[1], dtype=dtype, device=DEV)
    poison_free_memory()
    with torch.no_grad():
        out = layer(x)
    ids, probs = layer.last_ids, layer.last_probs
    assert not torch.isnan(out).any() and (ids >= 0).all()
    _, want_probs, want_ids = composed(layer, x)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(probs, want_probs, atol=1e-5, rtol=1e-4)  # logits summed in another order

    ref_layer = copy.deepcopy(layer)  # the LoRA weights' values in float32, as the reference takes them
    for p in list(ref_layer.lora_A.values()) + list(ref_layer.lora_B.values()):
        p.data = p.data.float()
    with torch.no_grad():
        same_precision = reference_forward(ref_layer, x)
        exact = reference_forward(ref_layer.double(), x.double())
    err = (out.double() - exact).abs().max().item()
    ref_err = (same_precision.double() - exact).abs().max().item()
    floor = FLOOR[dtype] * exact.abs().max().item()
    assert err <= 2 * ref_err + floor, (err, ref_err, floor)


def test_decode_path_is_taken_up_to_16_tokens():
    layer = decode_layer(CASES[1], torch.bfloat16)
    for T, taken in ((16, True), (17, False)):
        x = torch.randn(T, 264, dtype=torch.bfloat16, device=DEV)
        with torch.no_grad():
            names = kernel_names(lambda: layer(x))
        assert any("decode_swiglu_kernel" in n for n in names) == taken, (T, sorted(names))


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_variants_agree(case, monkeypatch):
    """Every variant gives the same bits."""
    layer = decode_layer(case, torch.float32)
    x = torch.randn(case[0], case[1], device=DEV)
    runs = {}
    for flags in FLAGS[1:]:
        monkeypatch.setenv("MIXLORA_DECODE_FLAGS", flags)
        poison_free_memory()
        with torch.no_grad():
            runs[flags] = (layer(x), layer.last_probs, layer.last_ids)
    out0, probs0, ids0 = runs["0"]
    for flags, (out, probs, ids) in runs.items():
        assert torch.equal(ids, ids0) and torch.equal(probs, probs0) and torch.equal(out, out0), flags


def test_decode_nan_routing_repeats_expert_zero(decode_flags):
    """NaN logits pick expert 0 for every slot (topk_warp.cuh); the other tokens are untouched."""
    layer = decode_layer(CASES[1], torch.float32)
    x = torch.randn(8, 264, device=DEV)
    x[3] = float("nan")
    with torch.no_grad():
        out = layer(x)
        want_out, _, want_ids = composed(layer, x)
    assert torch.equal(layer.last_ids, want_ids) and (layer.last_ids[3] == 0).all()
    keep = torch.arange(8, device=DEV) != 3
    torch.testing.assert_close(out[keep], want_out[keep], rtol=1e-4, atol=1e-4 * want_out[keep].abs().max().item())


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=str)
def test_decode_bitwise_deterministic(dtype, decode_flags):
    layer = decode_layer(CASES[2], dtype)
    x = torch.randn(16, 264, dtype=dtype, device=DEV)
    runs = []
    for _ in range(2):
        poison_free_memory()
        with torch.no_grad():
            runs.append((layer(x), layer.last_probs, layer.last_ids))
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_decode_cuda_graph_replay(decode_flags):
    layer = decode_layer(CASES[1], torch.bfloat16)
    static_x = torch.randn(8, 264, dtype=torch.bfloat16, device=DEV)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        layer(static_x)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), torch.no_grad():
        static_out = layer(static_x)
    x = torch.randn_like(static_x)
    static_x.copy_(x)
    graph.replay()
    torch.cuda.synchronize()
    with torch.no_grad():
        assert torch.equal(static_out, layer(x))


@pytest.mark.parametrize("why", ["tokens", "dropout", "experts", "mixed_lora_dtypes"])
def test_fallback_is_the_composed_forward(why):
    """Calls the decode path does not take give the composed forward's bits."""
    case = list(CASES[1])
    if why == "tokens":
        case[0] = 17
    if why == "experts":
        case[3] = 65
    layer = decode_layer(tuple(case), torch.bfloat16)
    if why == "mixed_lora_dtypes":
        layer.lora_A["up_proj"].data = layer.lora_A["up_proj"].data.bfloat16()
    x = torch.randn(case[0], 264, dtype=torch.bfloat16, device=DEV)
    dropout = 0.1 if why == "dropout" else 0.0
    args = list(op_args(layer, x))
    args[-2] = dropout
    with torch.no_grad():
        got = OP(*args)
        want = OP.redispatch(torch._C.DispatchKeySet(torch._C.DispatchKey.CPU), *args)
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_bad_shapes_raise_the_composed_forwards_errors():
    layer = decode_layer(CASES[1], torch.bfloat16)
    args = list(op_args(layer, torch.randn(3, 264, dtype=torch.bfloat16, device=DEV)))
    args[9] = args[9][:, :-1]  # Bg [E, I - 1, r]
    with torch.no_grad(), pytest.raises(RuntimeError):
        OP(*args)


def test_decode_opcheck():
    layer = decode_layer(CASES[0], torch.bfloat16)
    args = op_args(layer, torch.randn(4, 72, dtype=torch.bfloat16, device=DEV))
    args = tuple(a.detach() if isinstance(a, torch.Tensor) else a for a in args)
    torch.library.opcheck(OP, args, test_utils=("test_schema", "test_faketensor"))
