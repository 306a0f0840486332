"""inject_mixlora: turn a Hugging Face Llama / Mistral / Qwen2 causal LM into a MixLoRA model.

Every decoder layer's MLP is replaced by a `MixLoRAFFN` and every targeted attention
projection by a `LoRALinear`, both as registered submodules (so `state_dict`,
`named_parameters`, `.to()`, `.eval()` and `.train()` reach them). The base model is frozen;
only the router, LoRA and DoRA magnitude weights train.

Each adapter module has a key prefix in the authors' checkpoint naming (SPEC section 3):
`mixlora.layers.{L}.mlp` for the FFN, `mixlora.layers.{L}.self_attn.{proj}` for attention LoRA.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Iterator, List, NamedTuple, Tuple

import torch
from torch import nn

from .config import ATTENTION_PROJECTIONS, MixLoRAConfig
from .layer import MixLoRAFFN
from .lora import LoRALinear, lora_weight_norm

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM")


class _Patch(NamedTuple):
    """One module replacement: `setattr(parent, attr, module)`, known as `prefix` in checkpoints."""
    parent: nn.Module
    attr: str
    prefix: str
    module: nn.Module


def is_mixlora_model(model: nn.Module) -> bool:
    return any(isinstance(m, (MixLoRAFFN, LoRALinear)) for m in model.modules())


def check_supported(model: nn.Module) -> None:
    """Raises unless `model` is an unpatched Llama, Mistral or Qwen2 causal LM."""
    import transformers  # lazily: `import mixlora_ext` must work without transformers

    classes = tuple(getattr(transformers, name) for name in SUPPORTED_ARCHITECTURES)
    if not isinstance(model, classes):
        raise TypeError(f"MixLoRA supports {', '.join(SUPPORTED_ARCHITECTURES)}; "
                        f"got {type(model).__name__}")
    if is_mixlora_model(model):
        raise ValueError(f"this {type(model).__name__} already carries a MixLoRA adapter; "
                         "inject or load into a fresh base model")


def adapter_parameters(module: nn.Module) -> Iterator[Tuple[str, nn.Parameter]]:
    """The trainable parameters of a MixLoRAFFN or LoRALinear: all but its frozen base layer's."""
    return ((name, p) for name, p in module.named_parameters() if not name.startswith("base_layer."))


def named_adapter_modules(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(checkpoint prefix, module) of every MixLoRAFFN and LoRALinear of a patched model, in layer order."""
    found = []
    layers = getattr(getattr(model, "model", None), "layers", None)
    for idx, layer in enumerate(layers if layers is not None else []):
        if isinstance(layer.mlp, MixLoRAFFN):
            found.append((f"mixlora.layers.{idx}.mlp", layer.mlp))
        for proj in ATTENTION_PROJECTIONS:
            module = getattr(layer.self_attn, proj, None)
            if isinstance(module, LoRALinear):
                found.append((f"mixlora.layers.{idx}.self_attn.{proj}", module))
    return found


@torch.no_grad()
def reset_dora_magnitudes(module: nn.Module) -> None:
    """DoRA: magnitude = ||W + s*B*A|| per output row (per expert), in the adapter's dtype.

    This is what the authors' loader sets (they never store magnitudes); it makes DoRA a no-op
    until the magnitudes are trained.
    """
    if isinstance(module, LoRALinear):
        if module.use_dora:
            module.reset_magnitude()
        return
    for proj, magnitude in module.magnitude.items():
        weight = getattr(module.base_layer, proj).weight                            # [out, in]
        magnitude.copy_(lora_weight_norm(weight, module.lora_A[proj], module.lora_B[proj], module.scaling))


def build_patches(model: nn.Module, config: MixLoRAConfig) -> List[_Patch]:
    """Creates the adapter modules of `model` without attaching them (load_adapter checks them first).

    Adapter weights are float32 (float64 in a float64 model, so that float64 stays exact).
    """
    hidden_act = getattr(model.config, "hidden_act", None)
    patches = []
    for idx, layer in enumerate(model.model.layers):
        patches.append(_Patch(layer, "mlp", f"mixlora.layers.{idx}.mlp",
                              MixLoRAFFN(layer.mlp, config, hidden_act=hidden_act)))
        for proj in config.attention_targets:
            base = getattr(layer.self_attn, proj, None)
            if not isinstance(base, nn.Linear):
                raise TypeError(f"layer {idx}: self_attn.{proj} must be an nn.Linear to take LoRA, "
                                f"got {type(base).__name__}")
            patches.append(_Patch(layer.self_attn, proj, f"mixlora.layers.{idx}.self_attn.{proj}",
                                  LoRALinear(base, config.attention_lora)))
    for patch in patches:
        base_dtype = next(patch.module.base_layer.parameters()).dtype
        if torch.promote_types(torch.float32, base_dtype) != torch.float32:
            patch.module.to(base_dtype)  # the base is already in it; only the adapter converts
            reset_dora_magnitudes(patch.module)  # now exact in the new dtype
    return patches


def attach_patches(model: nn.Module, config: MixLoRAConfig, patches: List[_Patch]) -> None:
    """Installs built patches, freezes the base model and records the config as `model.mixlora_config`."""
    for patch in patches:
        setattr(patch.parent, patch.attr, patch.module)
    model.requires_grad_(False)
    for patch in patches:
        for _, p in adapter_parameters(patch.module):
            p.requires_grad_(True)
    # The recorded config names what the model uses, so that a saved folder also works with the
    # authors' loader, which requires both keys.
    config = copy.deepcopy(config)
    if config.base_model_name_or_path is None:
        config.base_model_name_or_path = getattr(model, "name_or_path", "") or ""
    if config.act_fn is None:
        config.act_fn = getattr(model.config, "hidden_act", None)
    model.mixlora_config = config


@contextlib.contextmanager
def unchanged_on_error(model: nn.Module):
    """Building adapter modules freezes base weights; if patching then fails, unfreeze them again."""
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        yield
    except BaseException:
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def inject_mixlora(model: nn.Module, config: MixLoRAConfig) -> nn.Module:
    """Patches `model` (LlamaForCausalLM, MistralForCausalLM or Qwen2ForCausalLM) in place with MixLoRA.

    Every decoder MLP becomes a `MixLoRAFFN`; the attention projections named in
    `config.target_modules` get LoRA with the top-level r / lora_alpha / lora_dropout. The base
    model is frozen, so only router, LoRA and DoRA magnitude weights have `requires_grad`.
    Returns `model`.
    """
    if not isinstance(config, MixLoRAConfig):
        raise TypeError(f"inject_mixlora: config must be a MixLoRAConfig, got {type(config).__name__}")
    check_supported(model)
    with unchanged_on_error(model):
        attach_patches(model, config, build_patches(model, config))
    return model
