"""mixlora_ext: MixLoRA (sparse mixture of LoRA experts) as a compiled PyTorch extension."""
from . import ops
from .aux_loss import expert_load, router_aux_loss
from .checkpoint import adapter_state_dict, load_adapter, restore_adapter_weights, save_adapter
from .config import LoRASettings, MixLoRAConfig
from .layer import MixLoRAFFN
from .lora import LoRALinear
from .model import inject_mixlora
from .reference import reference_forward

__version__ = "0.1.0"

__all__ = [
    "LoRALinear", "LoRASettings", "MixLoRAConfig", "MixLoRAFFN", "MixLoRATrainer",
    "adapter_state_dict", "expert_load", "inject_mixlora", "load_adapter", "ops",
    "reference_forward", "restore_adapter_weights", "router_aux_loss", "save_adapter",
]


def __getattr__(name):  # MixLoRATrainer imports transformers: only on first use
    if name == "MixLoRATrainer":
        from .trainer import MixLoRATrainer
        return MixLoRATrainer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
