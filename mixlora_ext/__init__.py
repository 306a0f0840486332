"""mixlora_ext: MixLoRA (sparse mixture of LoRA experts) as a compiled PyTorch extension."""
from . import ops
from .config import LoRASettings, MixLoRAConfig
from .layer import MixLoRAFFN
from .reference import reference_forward

__version__ = "0.1.0"

__all__ = ["LoRASettings", "MixLoRAConfig", "MixLoRAFFN", "ops", "reference_forward"]
