"""Generated LoRAs as files: kohya (as the official Save-LoRA node writes it) and diffusers/PEFT.

kohya keys, one triple per adapted linear (facts §3.3):
    lora_unet_<path with _>.alpha              0-d float32, rank / 2
    lora_unet_<path with _>.lora_down.weight   [r, in]
    lora_unet_<path with _>.lora_up.weight     [out, r]
e.g. `lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_out_0.lora_up.weight`.
ComfyUI, A1111 and diffusers' `load_lora_weights` read it. The diffusers/PEFT file has keys
`unet.<path>.lora_A.weight` / `.lora_B.weight` with alpha / r folded into lora_B.
Every file carries its provenance in the safetensors metadata.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from .lora import LoRAWeights, to_peft_state_dict

FORMATS = ("kohya", "diffusers")


def kohya_state_dict(lora: LoRAWeights, index: int = 0, dtype: torch.dtype = torch.float16) -> dict[str, torch.Tensor]:
    """One sample's LoRA in the kohya layout that the official Save-LoRA node writes."""
    state = {}
    for path, (down, up) in lora.layers.items():
        name = "lora_unet_" + path.replace(".", "_")
        state[f"{name}.alpha"] = torch.tensor(float(lora.alpha), dtype=torch.float32)
        state[f"{name}.lora_down.weight"] = down[index].detach().to(dtype).contiguous()
        state[f"{name}.lora_up.weight"] = up[index].detach().to(dtype).contiguous()
    return state


def hash_images(images: Iterable) -> str:
    """sha256 over the reference images (file paths hash their bytes, arrays/PIL images their pixels)."""
    digest = hashlib.sha256()
    for image in images:
        if isinstance(image, (str, Path)):
            digest.update(Path(image).read_bytes())
        else:
            array = np.ascontiguousarray(np.asarray(image))
            digest.update(str(array.shape).encode())
            digest.update(array.tobytes())
    return digest.hexdigest()


def save_lora(
    path: str | Path,
    lora: LoRAWeights,
    *,
    format: str = "kohya",
    index: int = 0,
    dtype: torch.dtype = torch.float16,
    config: dict | None = None,
    source_images_sha256: str | None = None,
    seed: int | None = None,
    extra_metadata: dict | None = None,
) -> Path:
    """Write one sample's LoRA to a .safetensors file with its provenance in the metadata."""
    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"{path}: LoRA files are written as .safetensors")
    if format == "kohya":
        state = kohya_state_dict(lora, index, dtype)
    else:
        state = to_peft_state_dict(lora, index, prefix="unet.", dtype=dtype)
    metadata = {
        "format": "pt",
        "hyperlora_format": format,
        "hyperlora_rank": str(lora.rank),
        "hyperlora_alpha": str(lora.alpha),
    }
    if config is not None:
        metadata["hyperlora_config"] = json.dumps(config, sort_keys=True)
    if source_images_sha256 is not None:
        metadata["hyperlora_source_images_sha256"] = source_images_sha256
    if seed is not None:
        metadata["hyperlora_seed"] = str(seed)
    for key, value in (extra_metadata or {}).items():
        metadata[f"hyperlora_{key}"] = value if isinstance(value, str) else json.dumps(value)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(path), metadata=metadata)
    return path


def lora_from_kohya(state: dict[str, torch.Tensor]) -> LoRAWeights:
    """A kohya state dict written by `kohya_state_dict` -> LoRAWeights keyed by diffusers path.

    Only names this package writes (diffusers-path kohya names) are understood; the batch
    dimension is restored with size 1.
    """
    from .targets import resolve_module_name

    layers, ranks, alphas = {}, set(), set()
    for key in state:
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        stem, _, layer = name.rpartition("_to_")
        layer = "to_" + layer
        if layer == "to_out_0":
            layer = "to_out.0"
        path = f"{resolve_module_name(stem)}.{layer}"
        down, up = state[key], state.get(f"{name}.lora_up.weight")
        if up is None:
            raise KeyError(f"{name}.lora_up.weight is missing")
        layers[path] = (down[None], up[None])
        ranks.add(down.shape[0])
        alphas.add(float(state[f"{name}.alpha"]) if f"{name}.alpha" in state else float(down.shape[0]))
    if len(ranks) != 1 or len(alphas) != 1:
        raise ValueError(f"expected one rank and one alpha across layers, found ranks {ranks} and alphas {alphas}")
    return LoRAWeights(layers, ranks.pop(), alphas.pop())
