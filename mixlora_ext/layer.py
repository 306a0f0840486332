"""MixLoRAFFN: a frozen HF-style MLP turned into a sparse mixture of LoRA experts.

The forward uses the exact rewrite of SPEC section 4: the frozen gate/up projections run once
per token, the experts' SwiGLU and the weighted combine are fused (`moe_swiglu`), and the
frozen down projection runs once per token on the weighted sum of expert activations. Only
rank-r and elementwise work is expert-specific. In eager mode all of it is one op,
`expert_ffn` (csrc/layer), with its backward in C++; under torch.compile, or with a base MLP
that trains, the ops with their own autograd. DoRA experts take the reference path.

Legend: T tokens, H hidden, I intermediate, E experts, k slots, r rank.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import ops
from .config import MixLoRAConfig
from .reference import _make_drop, reference_experts

_TORCH_ACTIVATIONS = {
    0: F.silu,
    1: F.gelu,
    2: lambda x: F.gelu(x, approximate="tanh"),
    3: F.relu,
}
# Activation modules by class name (transformers' ACT2FN and torch.nn), for MLPs whose
# activation is only known through their `act_fn` attribute.
_ACTIVATION_CLASSES = {
    "SiLU": 0, "SiLUActivation": 0, "GELU": 1, "GELUActivation": 1, "PytorchGELUTanh": 2,
    "GELUTanh": 2, "NewGELUActivation": 2, "FastGELUActivation": 2, "ReLU": 3,
}


def _activation_code(name_or_module) -> int:
    if isinstance(name_or_module, str):
        code = ops.ACTIVATIONS.get(name_or_module)
        if code is None:
            raise ValueError(f"MixLoRAFFN: activation {name_or_module!r} is not supported; "
                             f"supported: {sorted(ops.ACTIVATIONS)}")
        return code
    if isinstance(name_or_module, nn.GELU):
        return 2 if name_or_module.approximate == "tanh" else 1
    code = _ACTIVATION_CLASSES.get(type(name_or_module).__name__)
    if code is None:
        raise ValueError(f"MixLoRAFFN: cannot tell the activation of {type(name_or_module).__name__}; "
                         "set config.act_fn (one of "
                         f"{sorted(ops.ACTIVATIONS)})")
    return code


_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


def _linear(module: nn.Module, name: str) -> nn.Linear:
    proj = getattr(module, name, None)
    if not isinstance(proj, nn.Linear):
        raise TypeError(f"MixLoRAFFN: base_mlp.{name} must be an nn.Linear, got "
                        f"{type(proj).__name__ if proj is not None else 'nothing'}")
    return proj


class MixLoRAFFN(nn.Module):
    """MixLoRA mixture of LoRA experts around a frozen `gate_proj/up_proj/down_proj` MLP.

    Args:
        base_mlp: the frozen MLP (e.g. `LlamaMLP`): `gate_proj`, `up_proj` (H -> I) and
            `down_proj` (I -> H) as `nn.Linear`, and `act_fn`.
        config: a `MixLoRAConfig`; the experts use its `expert_lora` block where present.
        hidden_act: the model's activation name, used when `config.act_fn` is not set;
            with neither, the activation is read off `base_mlp.act_fn`.

    Parameters (float32, on the base MLP's device): `router` [E, H]; for each targeted
    projection `lora_A[proj]` [E, r, in] and `lora_B[proj]` [E, out, r]; with DoRA,
    `magnitude[proj]` [E, out]. After each forward, `last_probs` [T, E] and `last_ids` [T, k]
    hold what the load-balance loss needs.
    """

    def __init__(self, base_mlp: nn.Module, config: MixLoRAConfig, hidden_act: Optional[str] = None):
        super().__init__()
        gate, up, down = (_linear(base_mlp, n) for n in _PROJ_NAMES)
        hidden, inter = gate.in_features, gate.out_features
        if (up.in_features, up.out_features) != (hidden, inter) or \
                (down.in_features, down.out_features) != (inter, hidden):
            raise ValueError(f"MixLoRAFFN: inconsistent MLP shapes: gate_proj {hidden}->{inter}, "
                             f"up_proj {up.in_features}->{up.out_features}, "
                             f"down_proj {down.in_features}->{down.out_features}")
        if not config.expert_targets:
            raise ValueError("MixLoRAFFN: target_modules names none of gate_proj, up_proj, down_proj, "
                             "so the experts would have nothing to adapt")
        expert = config.expert_lora_settings
        act = config.act_fn or hidden_act or getattr(base_mlp, "act_fn", None)
        if act is None:
            raise ValueError("MixLoRAFFN: no activation: set config.act_fn or pass hidden_act")

        self.base_layer = base_mlp
        for p in self.base_layer.parameters():
            p.requires_grad_(False)
        self.hidden_size, self.intermediate_size = hidden, inter
        self.num_experts, self.top_k, self.rank = config.num_experts, config.top_k, expert.r
        self.scaling, self.lora_dropout, self.use_dora = expert.scaling, expert.lora_dropout, expert.use_dora
        self.jitter_noise = config.jitter_noise
        self.router_aux_loss_coef = config.router_aux_loss_coef
        self.activation = _activation_code(act)
        self.act_fn = _TORCH_ACTIVATIONS[self.activation]

        factory = dict(dtype=torch.float32, device=gate.weight.device)
        E, r = self.num_experts, self.rank
        self.router = nn.Parameter(torch.empty(E, hidden, **factory))
        self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
        self.magnitude = nn.ParameterDict()
        for proj in config.expert_targets:
            base = getattr(base_mlp, proj)
            self.lora_A[proj] = nn.Parameter(torch.empty(E, r, base.in_features, **factory))
            self.lora_B[proj] = nn.Parameter(torch.empty(E, base.out_features, r, **factory))
        self.router_init_range = config.router_init_range
        self.reset_parameters()

        self.last_probs: Optional[Tensor] = None
        self.last_ids: Optional[Tensor] = None
        self.last_dropout_seed: Optional[int] = None

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Router ~ N(0, router_init_range); A kaiming-uniform(a=sqrt(5)) per expert; B = 0."""
        nn.init.normal_(self.router, std=self.router_init_range)
        for proj, A in self.lora_A.items():
            for e in range(self.num_experts):
                nn.init.kaiming_uniform_(A[e], a=math.sqrt(5))
            nn.init.zeros_(self.lora_B[proj])
        if self.use_dora:  # magnitude = ||W + s B A||_row, which is ||W||_row while B = 0
            for proj in self.lora_A:
                norm = torch.linalg.norm(getattr(self.base_layer, proj).weight.float(), dim=1)
                self.magnitude[proj] = nn.Parameter(norm.expand(self.num_experts, -1).clone())

    def extra_repr(self) -> str:
        return (f"hidden={self.hidden_size}, intermediate={self.intermediate_size}, "
                f"experts={self.num_experts}, top_k={self.top_k}, r={self.rank}, "
                f"targets={list(self.lora_A)}, dora={self.use_dora}")

    def _frozen_tensors(self) -> list:
        """Weight and bias of gate_proj, up_proj, down_proj (bias None when absent), read off the
        modules' own tables: through nn.Module.__getattr__ these nine lookups cost ~15 us of
        host time on this project's CPU, as much as a decode step's GPU kernels (bench/NOTES.md
        v7); the tables cost ~1 us. Falls back to getattr for what a table does not hold."""
        base = self._modules["base_layer"]
        mods = base._modules
        out = []
        for name in _PROJ_NAMES:
            proj = mods[name] if name in mods else getattr(base, name)
            params = proj._parameters
            out.append(params["weight"] if "weight" in params else proj.weight)
            out.append(params["bias"] if "bias" in params else getattr(proj, "bias", None))
        return out

    def forward(self, x: Tensor) -> Tensor:
        router = self._parameters["router"]
        if x.shape[-1] != self.hidden_size:
            raise ValueError(f"MixLoRAFFN: x must have last dimension {self.hidden_size} "
                             f"(hidden size), got shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"MixLoRAFFN: x must be floating point, got {x.dtype}")
        if x.device != router.device:
            raise ValueError(f"MixLoRAFFN: x is on {x.device} but the layer's weights are on "
                             f"{router.device}; move one of them (layer.to(x.device))")
        flat = x.dim() == 2
        x2 = x if flat else x.reshape(-1, self.hidden_size)                        # [T, H]
        if self.training and self.jitter_noise > 0:
            x2 = x2 * torch.empty_like(x2).uniform_(1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        dropout_p = self.lora_dropout if self.training else 0.0
        seed = 0
        if dropout_p > 0:  # one fresh seed per forward, from torch's CPU generator (no device sync)
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))  # host-sync-ok: CPU tensor
        # (Plain attributes, set past nn.Module.__setattr__: ~7 us each on the host, which
        # bounds decode; bench/NOTES.md v5.)
        state = self.__dict__
        state["last_dropout_seed"] = seed
        fused = not self.use_dora and not torch.compiler.is_compiling()
        if fused:
            frozen = self._frozen_tensors()
            fused = not any(t is not None and t.requires_grad for t in frozen)
        if fused:
            # Eager: the whole expert FFN as one op with a C++ autograd kernel (csrc/layer), the
            # same math with far less host work per step than the per-op autograd below, which
            # torch.compile traces instead (it has no host work per op to save) and which also
            # serves base MLPs that train. Without grad mode (inference, generate()) the op
            # records no autograd node and keeps nothing for a backward.
            # (The ParameterDicts' own tables: their .get costs ~1.5 us a call on the host.)
            A, B = self.lora_A._parameters, self.lora_B._parameters
            out, probs, ids = ops._ops.expert_ffn(
                x2, *frozen, router, A.get("gate_proj"), B.get("gate_proj"), A.get("up_proj"),
                B.get("up_proj"), A.get("down_proj"), B.get("down_proj"), self.top_k,
                self.scaling, self.activation, dropout_p, seed)
            state["last_probs"], state["last_ids"] = probs, ids
            return out if flat else out.reshape(x.shape)
        base = self.base_layer
        acc = ops.acc_dtype(x2.dtype)
        logits = ops.router_logits(x2, self.router.to(acc))                        # [T, E]
        weights, ids, probs = ops.topk_gating(logits, self.top_k)                  # [T, k], [T, k], [T, E]
        state["last_probs"], state["last_ids"] = probs, ids
        if self.use_dora:
            drop = _make_drop(self, x2, seed if dropout_p > 0 else None)
            return reference_experts(self, x2, weights, ids, drop).reshape(x.shape)

        G, U = base.gate_proj(x2), base.up_proj(x2)                                # [T, I]

        def lora(table, proj):
            return table[proj].to(x2.dtype) if proj in table else None

        def shrink(proj, stream):
            A = lora(self.lora_A, proj)
            return ops.lora_shrink(x2, A, ids, dropout_p, seed, stream) if A is not None else None

        zg, zu = shrink("gate_proj", ops.STREAM_GATE), shrink("up_proj", ops.STREAM_UP)  # [T, k, r]
        hbar, zd = ops.moe_swiglu(G, U, ids, weights, zg, lora(self.lora_B, "gate_proj"), zu,
                                  lora(self.lora_B, "up_proj"), lora(self.lora_A, "down_proj"),
                                  self.scaling, self.activation, dropout_p, seed)  # [T, I], [T, k, r]
        out = base.down_proj(hbar)                                                 # [T, H]
        if "down_proj" in self.lora_B:
            out = out + ops.lora_expand(zd, lora(self.lora_B, "down_proj"), ids, weights * self.scaling)
        return out.reshape(x.shape)
