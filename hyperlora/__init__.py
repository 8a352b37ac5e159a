"""hyperlora: zero-shot LoRA generation for portraits (a re-implementation of HyperLoRA, CVPR 2025)."""

from .config import HyperLoRAConfig, preset
from .hypernet import HyperLoRA
from .lora import LoRAWeights, functional_lora, load_into_diffusers
from .targets import TargetModule, find_targets

__all__ = [
    "HyperLoRA",
    "HyperLoRAConfig",
    "LoRAWeights",
    "TargetModule",
    "find_targets",
    "functional_lora",
    "load_into_diffusers",
    "preset",
]
__version__ = "0.1.0"
