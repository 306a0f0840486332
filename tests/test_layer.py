"""MixLoRAFFN against the authors' algorithm (mixlora_ext.reference) on the same weights."""
import pytest
import torch
from torch import nn

from conftest import TinyMLP, lora_params, make_layer
from mixlora_ext import MixLoRAConfig, MixLoRAFFN, reference_forward


def _forward_backward(fn, layer, x):
    """Output and the gradients of x and of every router/LoRA parameter, for a random cotangent."""
    for p in layer.parameters():
        p.grad = None
    x = x.detach().clone().requires_grad_(True)
    out = fn(layer, x)
    cotangent = torch.randn_like(out)
    out.backward(cotangent)
    grads = {"x": x.grad}
    grads.update({name: p.grad for name, p in lora_params(layer).items()})
    return out.detach(), grads, cotangent


def _compare(layer, x, atol, rtol):
    torch.manual_seed(1)
    out, grads, _ = _forward_backward(lambda m, v: m(v), layer, x)
    torch.manual_seed(1)
    ref_out, ref_grads, _ = _forward_backward(reference_forward, layer, x)
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name] is not None, f"no gradient for {name}"
        torch.testing.assert_close(grads[name], ref_grads[name], atol=atol, rtol=rtol, msg=name)


@pytest.mark.parametrize("num_experts,top_k", [(1, 1), (4, 1), (4, 2), (4, 4), (8, 2), (8, 8),
                                                (16, 1), (16, 2), (16, 16)])
@pytest.mark.parametrize("tokens", [1, 7, 33])
def test_matches_reference_float64(num_experts, top_k, tokens):
    layer = make_layer(hidden=13, inter=21, num_experts=num_experts, top_k=top_k, r=3)
    _compare(layer, torch.randn(tokens, 13, dtype=torch.float64), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("targets", [("gate_proj",), ("up_proj",), ("down_proj",),
                                     ("gate_proj", "down_proj"), ("up_proj", "down_proj")])
def test_partial_targets(targets):
    layer = make_layer(num_experts=4, top_k=2, targets=targets)
    _compare(layer, torch.randn(9, 16, dtype=torch.float64), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("act", [nn.GELU(), nn.GELU(approximate="tanh"), nn.ReLU()])
def test_other_activations_and_bias(act):
    torch.manual_seed(0)
    config = MixLoRAConfig(num_experts=4, top_k=2, r=4, lora_alpha=8, lora_dropout=0.0)
    layer = MixLoRAFFN(TinyMLP(16, 24, bias=True, act=act), config).double()
    with torch.no_grad():
        for p in list(layer.lora_B.values()):
            p.normal_(0, 0.3)
    _compare(layer, torch.randn(11, 16, dtype=torch.float64), atol=1e-10, rtol=1e-9)


def test_batched_and_noncontiguous_input():
    layer = make_layer()
    x = torch.randn(3, 16, 5, dtype=torch.float64).transpose(1, 2)  # [B=3, S=5, H=16], strided
    assert not x.is_contiguous()
    out = layer(x)
    assert out.shape == x.shape
    torch.testing.assert_close(out, reference_forward(layer, x), atol=1e-10, rtol=1e-9)
    _compare(layer, x, atol=1e-10, rtol=1e-9)


def test_zero_tokens():
    layer = make_layer()
    x = torch.randn(0, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    assert out.shape == (0, 16)
    out.sum().backward()
    assert x.grad.shape == (0, 16)
    assert torch.count_nonzero(layer.router.grad) == 0


def test_rslora_scaling():
    layer = make_layer(r=4, use_rslora=True)
    assert layer.scaling == pytest.approx(8 / 2.0)
    _compare(layer, torch.randn(7, 16, dtype=torch.float64), atol=1e-10, rtol=1e-9)


def test_dora_experts_follow_reference():
    layer = make_layer(use_dora=True)
    with torch.no_grad():
        for m in layer.magnitude.values():
            m.mul_(torch.rand_like(m) + 0.5)
    _compare(layer, torch.randn(7, 16, dtype=torch.float64), atol=1e-10, rtol=1e-9)


def test_dropout_uses_kernel_masks_and_matches_reference():
    layer = make_layer(lora_dropout=0.3).train()
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    seed = layer.last_dropout_seed
    ref = reference_forward(layer, x, dropout_seed=seed)
    torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-9)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, [x, *lora_params(layer).values()], g)
    want = torch.autograd.grad(ref, [x, *lora_params(layer).values()], g)
    for name, a, b in zip(["x", *lora_params(layer)], got, want):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-9, msg=name)
    # eval() turns dropout off: the output is then deterministic and equals the no-dropout one
    layer.eval()
    torch.testing.assert_close(layer(x), reference_forward(layer, x), atol=1e-10, rtol=1e-9)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-5), (torch.bfloat16, None)])
def test_low_precision_inputs(dtype, atol):
    layer = make_layer(hidden=32, inter=48, num_experts=8, top_k=2, r=8, dtype=torch.float32)
    layer.base_layer.to(dtype)
    x = torch.randn(17, 32, dtype=dtype)
    out = layer(x)
    assert out.dtype == dtype
    exact = reference_forward(layer.double(), x.double())
    layer.float().base_layer.to(dtype)
    same_precision = reference_forward(layer, x)
    err = (out.double() - exact).abs().max().item()
    ref_err = (same_precision.double() - exact).abs().max().item()
    # flash-attention style: our error is at most ~2x the reference's own error in this dtype
    assert err <= 2 * ref_err + (atol or 1e-2 * exact.abs().max().item()), (err, ref_err)


def test_aux_state_kept_from_last_forward():
    layer = make_layer(num_experts=8, top_k=2)
    layer(torch.randn(2, 5, 16, dtype=torch.float64))
    assert layer.last_probs.shape == (10, 8) and layer.last_ids.shape == (10, 2)
    assert layer.last_probs.requires_grad
    torch.testing.assert_close(layer.last_probs.sum(-1), torch.ones(10, dtype=torch.float64))


def test_no_grad_forward_is_the_same():
    """Without grad mode the layer's op records no autograd node and keeps nothing for a
    backward: the same output bits, routing state without grad, and no graph."""
    layer = make_layer(num_experts=8, top_k=2)
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with_grad = layer(x)
    ids = layer.last_ids
    with torch.no_grad():
        without = layer(x)
    assert torch.equal(with_grad.detach(), without) and not without.requires_grad
    assert torch.equal(layer.last_ids, ids) and not layer.last_probs.requires_grad
    with torch.inference_mode():
        assert torch.equal(layer(x), without)


def test_only_router_and_lora_train():
    layer = make_layer()
    trainable = {n for n, p in layer.named_parameters() if p.requires_grad}
    assert trainable == {"router", "lora_A.gate_proj", "lora_A.up_proj", "lora_A.down_proj",
                         "lora_B.gate_proj", "lora_B.up_proj", "lora_B.down_proj"}
    assert all(not p.requires_grad for p in layer.base_layer.parameters())


@pytest.mark.parametrize("kwargs,match", [
    (dict(top_k=5, num_experts=4), "top_k"),
    (dict(num_experts=0), "num_experts"),
    (dict(r=0), "r must be"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(target_modules=["q_proj"]), "none of gate_proj"),
    (dict(target_modules=["fc1"]), "unsupported names"),
    (dict(expert_lora={"r": 0}), "expert_lora.r"),
])
def test_bad_config_is_a_clear_error(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MixLoRAFFN(TinyMLP(16, 24), MixLoRAConfig(**kwargs))


def test_bad_input_is_a_clear_error():
    layer = make_layer()
    with pytest.raises(ValueError, match="last dimension 16"):
        layer(torch.randn(3, 15, dtype=torch.float64))
    with pytest.raises(TypeError, match="floating point"):
        layer(torch.ones(3, 16, dtype=torch.int64))
    with pytest.raises(ValueError, match="x is on meta but the layer's weights are on cpu"):
        layer(torch.empty(3, 16, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="gate_proj must be an nn.Linear"):
        MixLoRAFFN(nn.Module(), MixLoRAConfig())
    mlp = TinyMLP(16, 24)
    mlp.up_proj = nn.Linear(16, 23, bias=False)
    with pytest.raises(ValueError, match="inconsistent MLP shapes"):
        MixLoRAFFN(mlp, MixLoRAConfig())


@pytest.mark.parametrize("grad", (True, False), ids=("grad", "no_grad"))
def test_mismatched_expert_weights_are_a_clear_error(grad):
    """Raised by an op inside the layer's step, with and without an autograd node to build
    (on the device a build that carried its own copy of libstdc++ crashed formatting this
    message; setup.py links the shared one: bench/NOTES.md v7)."""
    layer = make_layer(num_experts=4)
    with torch.no_grad():
        layer.lora_B["gate_proj"] = nn.Parameter(torch.zeros(3, 24, 4, dtype=torch.float64))
    with torch.set_grad_enabled(grad), pytest.raises(RuntimeError, match="must match the other expert weights"):
        layer(torch.randn(5, 16, dtype=torch.float64))


def test_expert_ffn_frozen_weights_requiring_grad_are_a_clear_error():
    layer = make_layer(num_experts=4)
    base = layer.base_layer
    A, B = layer.lora_A, layer.lora_B
    lora = [table[proj] for proj in ("gate_proj", "up_proj", "down_proj") for table in (A, B)]
    base.gate_proj.weight.requires_grad_(True)
    with pytest.raises(RuntimeError, match="frozen MLP weights must not require grad"):
        torch.ops.mixlora.expert_ffn(torch.randn(5, 16, dtype=torch.float64), base.gate_proj.weight,
                                     None, base.up_proj.weight, None, base.down_proj.weight, None,
                                     layer.router, *lora, 2, layer.scaling, layer.activation, 0.0, 0)


def test_module_plumbing():
    layer = make_layer()
    assert {"router", "lora_A.gate_proj", "lora_B.down_proj"} <= set(layer.state_dict())
    layer.float()
    assert layer.router.dtype == torch.float32 and layer.lora_A["up_proj"].dtype == torch.float32
    assert "experts=4" in repr(layer)


@pytest.mark.parametrize("requires_grad", (False, True))
@pytest.mark.parametrize("lora_dtype", (torch.float64, torch.float32), ids=str)
@pytest.mark.parametrize("targets", [("gate_proj", "up_proj", "down_proj"), ("up_proj",)])
def test_expert_ffn_op_opcheck(targets, lora_dtype, requires_grad):
    """The layer step as one op (csrc/layer): schema, fake tensors, its C++ autograd kernel,
    also where the LoRA weights are cast to x's dtype and with biases."""
    layer = make_layer(num_experts=4, top_k=2, targets=targets, bias=True)
    base = layer.base_layer
    gate, up, down = base.gate_proj, base.up_proj, base.down_proj
    lora = [None if proj not in layer.lora_A else
            table[proj].detach().to(lora_dtype).requires_grad_(requires_grad)
            for proj in ("gate_proj", "up_proj", "down_proj") for table in (layer.lora_A, layer.lora_B)]
    x = torch.randn(9, 16, dtype=torch.float64, requires_grad=requires_grad)
    router = layer.router.detach().requires_grad_(requires_grad)
    args = (x, gate.weight, gate.bias, up.weight, up.bias, down.weight, down.bias, router, *lora,
            2, layer.scaling, layer.activation, 0.0, 0)
    torch.library.opcheck(torch.ops.mixlora.expert_ffn.default, args)


def test_expert_ffn_backward_is_not_differentiable():
    layer = make_layer(num_experts=4, top_k=2)
    x = torch.randn(5, 16, dtype=torch.float64, requires_grad=True)
    out = layer(x)
    with pytest.raises(RuntimeError, match="not differentiable"):
        torch.autograd.grad(out.sum(), x, create_graph=True)
