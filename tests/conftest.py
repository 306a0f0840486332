"""Shared test helpers: tiny MLPs, randomized MixLoRA layers, CUDA skipping."""
import zlib

import pytest
import torch
from torch import nn

import mixlora_ext
from mixlora_ext import MixLoRAConfig, MixLoRAFFN

HAS_CUDA = torch.cuda.is_available() and mixlora_ext.ops.cuda_version() >= 0


@pytest.fixture(autouse=True)
def _seed_from_test_id(request):
    """Each test draws its random inputs from a seed of its own name (module and parameters,
    not the invocation path), so a failure reproduces on the next run."""
    torch.manual_seed(zlib.crc32(f"{request.node.module.__name__}::{request.node.name}".encode()))


def pytest_collection_modifyitems(config, items):
    skip = pytest.mark.skip(reason="needs a CUDA GPU and a CUDA build of mixlora_ext")
    for item in items:
        if "cuda" in item.keywords and not HAS_CUDA:
            item.add_marker(skip)


class TinyMLP(nn.Module):
    """The shape of LlamaMLP: down(act(gate(x)) * up(x))."""

    def __init__(self, hidden, inter, bias=False, act=None):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act_fn = act if act is not None else nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def make_layer(hidden=16, inter=24, num_experts=4, top_k=2, r=4, dtype=torch.float64,
               device="cpu", targets=("gate_proj", "up_proj", "down_proj"), bias=False,
               lora_dropout=0.0, **config_kwargs):
    """A MixLoRAFFN whose every weight is random (B is not left at zero: that hides bugs)."""
    torch.manual_seed(torch.randint(0, 2**31, ()).item())
    config = MixLoRAConfig(num_experts=num_experts, top_k=top_k, r=r, lora_alpha=2 * r,
                           lora_dropout=lora_dropout, target_modules=list(targets), **config_kwargs)
    layer = MixLoRAFFN(TinyMLP(hidden, inter, bias=bias), config).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.router.normal_(0, 1.0)
        for p in list(layer.lora_A.values()) + list(layer.lora_B.values()):
            p.normal_(0, 0.3)
    return layer


def lora_params(layer):
    """name -> parameter for the router and every LoRA weight."""
    params = {"router": layer.router}
    params.update({f"lora_A.{k}": v for k, v in layer.lora_A.items()})
    params.update({f"lora_B.{k}": v for k, v in layer.lora_B.items()})
    params.update({f"magnitude.{k}": v for k, v in layer.magnitude.items()})
    return params
