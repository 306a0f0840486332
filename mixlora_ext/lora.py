"""LoRALinear: a frozen nn.Linear plus one LoRA pair, for the targeted attention projections.

    y = base(x) + s * B(A(dropout(x)))                  s = alpha / r  (alpha / sqrt(r) with rsLoRA)
    y = m / ||W + s*B*A||_row * (base(x) + s * B(A(dropout(x))))          with DoRA

DoRA follows the authors' `LoraLinear.apply_dora`: the scale multiplies the whole base output
(bias included) and the weight norm is detached. Adapter weights keep their own dtype (float32
by default, as in the authors' checkpoints) and are cast to the activation dtype per forward.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import LoRASettings


def lora_weight_norm(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                     scaling: float) -> torch.Tensor:
    """||W + s * B @ A|| per output row (the DoRA denominator and the magnitude's initial value).

    Batched over leading dims of A [..., r, in] and B [..., out, r]; computed in the wider of
    the weights' dtypes and float32.
    """
    dtype = torch.promote_types(torch.promote_types(weight.dtype, lora_A.dtype), torch.float32)
    merged = weight.to(dtype) + scaling * (lora_B.to(dtype) @ lora_A.to(dtype))  # [..., out, in]
    return torch.linalg.vector_norm(merged, dim=-1)  # [..., out]


class LoRALinear(nn.Module):
    """A frozen `nn.Linear` with a trainable LoRA pair (`lora_A.weight` [r, in], `lora_B.weight` [out, r])."""

    def __init__(self, base_layer: nn.Linear, settings: LoRASettings):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"LoRALinear wraps an nn.Linear, got {type(base_layer).__name__}")
        self.base_layer = base_layer
        self.base_layer.requires_grad_(False)
        self.r = settings.r
        self.scaling = settings.scaling
        self.use_dora = settings.use_dora
        device = base_layer.weight.device
        self.lora_A = nn.Linear(base_layer.in_features, self.r, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(self.r, base_layer.out_features, bias=False, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(settings.lora_dropout) if settings.lora_dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        if self.use_dora:
            self.magnitude = nn.Parameter(torch.empty(base_layer.out_features, device=device, dtype=torch.float32))
            self.reset_magnitude()
        else:
            self.register_parameter("magnitude", None)

    @torch.no_grad()
    def reset_magnitude(self) -> None:
        """DoRA: magnitude = ||W + s*B*A|| per row, what the authors' loader sets (they never store it)."""
        self.magnitude.copy_(self._weight_norm())

    def _weight_norm(self) -> torch.Tensor:
        return lora_weight_norm(self.base_layer.weight, self.lora_A.weight, self.lora_B.weight, self.scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        A = self.lora_A.weight.to(x.dtype)
        B = self.lora_B.weight.to(x.dtype)
        result = result + self.scaling * F.linear(F.linear(self.lora_dropout(x), A), B)
        if self.use_dora:
            scale = self.magnitude / self._weight_norm().detach()  # [out]
            result = result * scale.to(x.dtype)
        return result

    def extra_repr(self) -> str:
        return f"r={self.r}, scaling={self.scaling:g}, use_dora={self.use_dora}"
