"""`python -m hyperlora info`: the size of a HyperLoRA for a UNet, built on the meta device."""

from __future__ import annotations

import torch

from .config import TOKENS_PER_MODULE, HyperLoRAConfig, preset
from .hypernet import HyperLoRA
from .targets import find_targets, lora_parameter_count
from .worlds.sdxl import build_unet

# The world -> (UNet architecture, hypernetwork preset) pairs that `info` knows.
WORLDS = {"sdxl": ("sdxl", "sdxl_v1"), "tiny": ("tiny", "tiny"), "mid": ("mid", "tiny")}


def describe(unet, config: HyperLoRAConfig) -> dict:
    """Module count, parameter counts and coefficient count; allocates nothing on `meta` UNets."""
    targets = find_targets(unet)
    with torch.device("meta"):
        model = HyperLoRA(config, targets)
    counts = model.parameter_counts()
    coefficients = TOKENS_PER_MODULE * len(targets) * config.hyper_dim
    lora = lora_parameter_count(targets, config.rank)
    return {
        "modules": len(targets),
        "linears": 4 * len(targets),
        "basis_parameters": counts["hyper_lora_modules"],
        "resampler_parameters": counts["resampler"],
        "id_projector_parameters": counts["id_projector"],
        "base_resampler_parameters": counts.get("base_resampler", 0),
        "equivalent_lora_parameters": lora,
        "coefficients": coefficients,
        "coefficient_ratio": coefficients / lora,
    }


def module_table(targets) -> list[dict]:
    """Target modules grouped by UNet block: count, hidden size, cross-attention width."""
    rows: dict[tuple, dict] = {}
    for t in targets:
        block = ".".join(t.name.split(".")[:2]) if not t.name.startswith("mid_block") else "mid_block"
        kind = "attn2 (cross)" if t.cross_attention_dim else "attn1 (self)"
        row = rows.setdefault((block, kind), {"block": block, "kind": kind, "modules": 0, "hidden_size": t.hidden_size,
                                              "cross_attention_dim": t.cross_attention_dim})  # fmt: skip
        row["modules"] += 1
    return list(rows.values())


def info(world: str = "sdxl", preset_name: str | None = None) -> dict:
    if world not in WORLDS:
        raise ValueError(f"unknown world {world!r}; known: {sorted(WORLDS)}")
    unet_name, default_preset = WORLDS[world]
    unet = build_unet(unet_name, device="meta")
    return describe(unet, preset(preset_name or default_preset))


def format_info(values: dict) -> str:
    lines = []
    for key, value in values.items():
        text = f"{value:.2%}" if key == "coefficient_ratio" else f"{value:,}"
        lines.append(f"{key.replace('_', ' '):<28} {text}")
    return "\n".join(lines)
