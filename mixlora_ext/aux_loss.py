"""The router load-balance loss (SPEC section 2) and per-expert load, from a model's last forward.

Pooled over the tokens of all MixLoRA layers (not a mean of per-layer losses), masked by the
attention mask:

    f[e] = sum_{layers, tokens t} m_t * #{j : sel[t, j] = e} / (L * sum_t m_t)
    P[e] = sum_{layers, tokens t} m_t * p[t, e]            / (L * sum_t m_t)
    aux  = router_aux_loss_coef * E * sum_e f[e] * P[e]

Only P carries gradient (into the routers). Both functions read `last_probs` / `last_ids` of
each `MixLoRAFFN` and never synchronize with the device.

Legend: L layers, T tokens (batch * seq), E experts, k slots.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layer import MixLoRAFFN


def _last_routing(model: nn.Module, attention_mask: Optional[Tensor]
                  ) -> Tuple[List[MixLoRAFFN], Tensor, Tensor, Tensor]:
    """(layers, probs [L, T, E], expert counts [L, T, E], mask [T]) of the last forward."""
    layers = [m for m in model.modules() if isinstance(m, MixLoRAFFN)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MixLoRA layers")
    if any(layer.last_probs is None for layer in layers):
        raise RuntimeError("no routing recorded yet: run a forward pass of the model first")
    tokens = {layer.last_probs.shape[0] for layer in layers}
    if len(tokens) != 1:
        raise RuntimeError(f"the MixLoRA layers last routed different token counts {sorted(tokens)}; "
                           "run one full forward pass of the model first")
    if torch.is_grad_enabled() and any(layer.training and layer.router.requires_grad
                                       and not layer.last_probs.requires_grad for layer in layers):
        raise RuntimeError("the last training forward recorded no gradient path to the routers, so the aux "
                           "loss could not train them; reentrant gradient checkpointing does this: enable "
                           "checkpointing with {'use_reentrant': False}")
    probs = torch.stack([layer.last_probs for layer in layers])                       # [L, T, E]
    ids = torch.stack([layer.last_ids for layer in layers]).long()                    # [L, T, k]
    num_tokens, num_experts = probs.shape[1], probs.shape[2]
    counts = F.one_hot(ids, num_experts).sum(dim=2).to(probs.dtype)                   # [L, T, E]
    if attention_mask is None:
        mask = probs.new_ones(num_tokens)                                              # [T]
    else:
        if attention_mask.numel() != num_tokens:
            raise ValueError(f"attention_mask has {attention_mask.numel()} entries (shape "
                             f"{tuple(attention_mask.shape)}) but the last forward routed {num_tokens} "
                             "tokens; pass the mask of that forward")
        mask = attention_mask.reshape(-1).to(device=probs.device, dtype=probs.dtype)  # [T]
    return layers, probs, counts, mask


def router_aux_loss(model: nn.Module, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The pooled, masked load-balance loss of the model's last forward, times `router_aux_loss_coef`.

    `attention_mask` [B, S] (1 = real token) is the mask of that forward; padding then counts
    for nothing. Add the result to the LM loss before `backward()`.
    """
    layers, probs, counts, mask = _last_routing(model, attention_mask)
    num_experts = probs.shape[2]
    denom = (len(layers) * mask.sum()).clamp_min(1)   # all-padding batch: loss 0, not nan
    f = (counts * mask[:, None]).sum(dim=(0, 1)) / denom                              # [E]
    P = (probs * mask[:, None]).sum(dim=(0, 1)) / denom                               # [E]
    return layers[0].router_aux_loss_coef * num_experts * (f * P).sum()


@torch.no_grad()
def expert_load(model: nn.Module, attention_mask: Optional[Tensor] = None) -> Tensor:
    """[L, E]: the share of each layer's (real token, slot) pairs routed to each expert in the
    last forward; rows sum to 1, a balanced router gives 1/E everywhere."""
    layers, _, counts, mask = _last_routing(model, attention_mask)
    pairs = (mask.sum() * layers[0].top_k).clamp_min(1)
    return (counts * mask[:, None]).sum(dim=1) / pairs
