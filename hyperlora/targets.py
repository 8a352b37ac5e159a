"""Which UNet linears get a LoRA, in which order, and how their names translate.

Every diffusers `Attention` inside the UNet's down, mid and up blocks is a target module; each
gets LoRA on `to_q`, `to_k`, `to_v` and `to_out.0` (facts §1.5: 140 modules on SDXL). The order
is the UNet's data flow, down -> mid -> up, and within a block the order of `named_modules`
(transformer block by transformer block, attn1 before attn2). Checkpoints carry their own order
in `hyper_lora_modules.json`; this order only decides how freshly built models are laid out.

Names come in three spellings:
- diffusers path:  down_blocks.1.attentions.0.transformer_blocks.0.attn1
- kohya, diffusers-style: lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1
- kohya, ldm-style:       lora_unet_input_blocks_4_1_transformer_blocks_0_attn1
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from diffusers.models.attention_processor import Attention
from torch import nn

# The linears of each target attention, as (key in the hypernetwork, path inside the Attention).
LORA_LAYERS = (("to_q", "to_q"), ("to_k", "to_k"), ("to_v", "to_v"), ("to_out", "to_out.0"))
LAYER_KEYS = tuple(key for key, _ in LORA_LAYERS)
LAYER_PATHS = dict(LORA_LAYERS)

BLOCK_ORDER = ("down_blocks", "mid_block", "up_blocks")
KOHYA_PREFIX = "lora_unet_"


@dataclass(frozen=True)
class TargetModule:
    """One attention module that receives LoRA on its four projections."""

    name: str  # diffusers path of the Attention module
    hidden_size: int  # query width: in of to_q, out of to_q/to_k/to_v/to_out
    cross_attention_dim: int | None  # width of encoder_hidden_states for cross-attention, else None

    def in_features(self, key: str) -> int:
        if key in ("to_k", "to_v"):
            return self.cross_attention_dim or self.hidden_size
        return self.hidden_size

    def out_features(self, key: str) -> int:
        return self.hidden_size

    def linear_path(self, key: str) -> str:
        """The diffusers path of the nn.Linear that layer `key` adapts."""
        return f"{self.name}.{LAYER_PATHS[key]}"

    @property
    def kohya_name(self) -> str:
        return KOHYA_PREFIX + self.name.replace(".", "_")

    def to_json(self) -> dict:
        return {"hidden_size": self.hidden_size, "cross_attention_dim": self.cross_attention_dim}


def find_targets(unet: nn.Module) -> list[TargetModule]:
    """All LoRA target modules of a diffusers UNet2DConditionModel, in the documented order."""
    targets = []
    for block_name in BLOCK_ORDER:
        block = getattr(unet, block_name, None)
        if block is None:
            continue
        for name, module in block.named_modules(prefix=block_name):
            if not isinstance(module, Attention):
                continue
            hidden = module.to_q.in_features
            if module.to_out[0].out_features != hidden:
                raise ValueError(f"{name}: to_out.0 maps to {module.to_out[0].out_features}, expected {hidden}")
            cross = module.to_k.in_features if module.is_cross_attention else None
            targets.append(TargetModule(name, hidden, cross))
    if not targets:
        raise ValueError(f"{type(unet).__name__} has no attention modules in {BLOCK_ORDER}: nothing to adapt")
    return targets


def lora_parameter_count(targets: list[TargetModule], rank: int) -> int:
    """Parameters of an ordinary rank-`rank` LoRA on the same layers (down r x in + up out x r)."""
    return sum(rank * (t.in_features(k) + t.out_features(k)) for t in targets for k in LAYER_KEYS)


# --- name translation -------------------------------------------------------------------------

_DIFFUSERS_KOHYA = re.compile(
    r"^(down_blocks_\d+_attentions_\d+|up_blocks_\d+_attentions_\d+|mid_block_attentions_\d+)"
    r"_transformer_blocks_(\d+)_(attn\d)$"
)
_LDM_KOHYA = re.compile(r"^(input_blocks_(\d+)_1|middle_block_1|output_blocks_(\d+)_1)_transformer_blocks_(\d+)_(attn\d)$")


def _layers_per_block(layers_per_block, num_blocks: int) -> list[int]:
    if isinstance(layers_per_block, int):
        return [layers_per_block] * num_blocks
    return list(layers_per_block)


def ldm_to_diffusers(block: str, layers_per_block=2, num_blocks: int = 3) -> str:
    """'input_blocks_4_1' -> 'down_blocks.1.attentions.0' (and output/middle) for an SDXL-layout UNet.

    In the ldm layout, input_blocks[0] is conv_in, each down block contributes its layers and then a
    downsampler (except the last); each up block contributes layers_per_block + 1 layers.
    """
    lpb = _layers_per_block(layers_per_block, num_blocks)
    if block == "middle_block_1":
        return "mid_block.attentions.0"
    kind, index = block.rsplit("_", 2)[0], int(block.rsplit("_", 2)[1])
    if kind == "input_blocks":
        position = 1
        for i, n in enumerate(lpb):
            if position <= index < position + n:
                return f"down_blocks.{i}.attentions.{index - position}"
            position += n + (1 if i < len(lpb) - 1 else 0)
    elif kind == "output_blocks":
        position = 0
        for i, n in enumerate(reversed(lpb)):
            if position <= index < position + n + 1:
                return f"up_blocks.{i}.attentions.{index - position}"
            position += n + 1
    raise ValueError(f"cannot map ldm block {block!r} with layers_per_block={layers_per_block}")


def diffusers_to_ldm(path: str, layers_per_block=2, num_blocks: int = 3) -> str:
    """'down_blocks.1.attentions.0.transformer_blocks.0.attn1' -> 'input_blocks_4_1_transformer_blocks_0_attn1'."""
    lpb = _layers_per_block(layers_per_block, num_blocks)
    parts = path.split(".")
    rest = "_".join(parts[-3:])  # transformer_blocks_0_attn1 -> from 'transformer_blocks', '0', 'attn1'
    if parts[0] == "mid_block":
        return f"middle_block_1_{rest}"
    block, attn = int(parts[1]), int(parts[3])
    if parts[0] == "down_blocks":
        index = 1 + sum(n + 1 for n in lpb[:block]) + attn
        return f"input_blocks_{index}_1_{rest}"
    index = sum(n + 1 for n in list(reversed(lpb))[:block]) + attn
    return f"output_blocks_{index}_1_{rest}"


def resolve_module_name(name: str, layers_per_block=2, num_blocks: int = 3) -> str:
    """Any of the three spellings -> the diffusers path. Raises ValueError naming the input."""
    if not name.startswith(KOHYA_PREFIX):
        if re.match(r"^(down_blocks|up_blocks|mid_block)\.", name):
            return name
        raise ValueError(f"module name {name!r} is neither a diffusers path nor a 'lora_unet_' kohya name")
    stem = name[len(KOHYA_PREFIX):]
    if match := _DIFFUSERS_KOHYA.match(stem):
        block = match.group(1)
        block = re.sub(r"^(down|up)_blocks_(\d+)_attentions_(\d+)$", r"\1_blocks.\2.attentions.\3", block)
        block = re.sub(r"^mid_block_attentions_(\d+)$", r"mid_block.attentions.\1", block)
        return f"{block}.transformer_blocks.{match.group(2)}.{match.group(3)}"
    if match := _LDM_KOHYA.match(stem):
        block = ldm_to_diffusers(match.group(1), layers_per_block, num_blocks)
        return f"{block}.transformer_blocks.{match.group(4)}.{match.group(5)}"
    raise ValueError(f"kohya module name {name!r} matches neither the diffusers-path nor the ldm-path style")
