"""Where weights come from: the real SDXL stack (`sdxl`) or the miniature the project trains (`toy`).

`load_world` assembles what `hyperlora.pipeline.HyperLoRAPipeline.from_pretrained` needs for one world: the base
pipeline, the conditioner's parts (CLIP image encoder, face analyser), the hypernetwork checkpoint (checked
against the pipeline's UNet) and the world's sampling defaults.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WORLD_NAMES = ("toy", "sdxl")


@dataclass(frozen=True)
class Sampling:
    """A world's generation defaults; `HyperLoRAPipeline.__call__` uses them unless told otherwise."""

    steps: int  # sampling steps (the official workflows: 20)
    guidance: float  # classifier-free guidance (SDXL workflows: 5; the toy base model: 3.5)
    negative_prompt: str | None  # SDXL: the release's; toy: none (its unconditional branch was trained on "")
    size: int | None  # px, square; None: the pipeline's own default (1024 for SDXL)

    def call_kwargs(self) -> dict:
        """The defaults as diffusers pipeline keyword arguments."""
        kwargs = {"num_inference_steps": self.steps, "guidance_scale": self.guidance}
        if self.negative_prompt:
            kwargs["negative_prompt"] = self.negative_prompt
        if self.size:
            kwargs.update(height=self.size, width=self.size)
        return kwargs


@dataclass
class World:
    """One world's parts, ready to wrap."""

    name: str
    pipe: object  # a diffusers StableDiffusionXLPipeline
    clip: object  # hyperlora.conditioning.clip_features.ClipImageEncoder
    analyzer: object  # hyperlora.conditioning.faces.FaceAnalyzer
    hyperlora: object  # hyperlora.hypernet.HyperLoRA
    sampling: Sampling
    checkpoint: Path
    label: str  # what the weights are, said loudly when they are stand-ins or untrained
    id_weight: float = 0.85  # the checkpoint's recommended ID-LoRA weight (`recommended_id_weight`)


def checkpoint_note(folder: Path) -> str:
    """The `label` a checkpoint's config.json carries (e.g. 'UNTRAINED ...'), else ''."""
    path = folder / "config.json"
    if not path.is_file():
        return ""
    return str(json.loads(path.read_text()).get("label", ""))


def load_world(world: str = "toy", *, checkpoint=None, pipeline=None, clip=None, insightface_root=None,
               face_backend: str | None = None, toy_dir=None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> World:  # fmt: skip
    """Load a world's pipeline, conditioner parts and HyperLoRA (in `dtype`, on `device`) from local folders.

    toy: everything defaults to data/toy (the checkpoint to data/toy/hyperlora, which must exist);
    sdxl: `pipeline`, `clip` and `checkpoint` are required, and `insightface_root` for antelopev2.
    """
    from ..checkpoint import load_checkpoint, recommended_id_weight

    if world == "toy":
        from .toy import TOY_SAMPLING, load_toy_parts, toy_checkpoint

        folder = toy_checkpoint(checkpoint)  # fails before anything slow is loaded
        if face_backend not in (None, "toy"):
            raise ValueError(f"the toy world's faces are found by its own backend 'toy', not {face_backend!r}")
        pipe, encoder, analyzer = load_toy_parts(pipeline=pipeline, clip=clip, toy_dir=toy_dir, dtype=dtype,
                                                 device=device)  # fmt: skip
        sampling, label = Sampling(**TOY_SAMPLING), f"toy world ({toy_dir or 'data/toy'})"
    elif world == "sdxl":
        from .sdxl import SDXL_SAMPLING, load_sdxl_parts, weights_label

        if not checkpoint:
            raise ValueError("the sdxl world needs --checkpoint DIR: a HyperLoRA folder such as the release's "
                             "sdxl_hyper_id_lora_v1_fidelity (hyper_lora_modules.json + *.safetensors)")  # fmt: skip
        folder = Path(checkpoint)
        pipe, encoder, analyzer = load_sdxl_parts(pipeline=pipeline, clip=clip, insightface_root=insightface_root,
                                                  face_backend=face_backend or "antelopev2", dtype=dtype,
                                                  device=device)  # fmt: skip
        sampling = Sampling(**SDXL_SAMPLING)
        label = f"sdxl world ({pipeline}): {weights_label(pipe, encoder.hidden_size)}"
    else:
        raise ValueError(f"world must be one of {WORLD_NAMES}, got {world!r}")
    model = load_checkpoint(folder, unet=pipe.unet, dtype=dtype, device=device).eval()
    note = checkpoint_note(folder)
    label += f"; HyperLoRA {folder}" + (f" ({note})" if note else "")
    return World(world, pipe, encoder, analyzer, model, sampling, folder, label, recommended_id_weight(folder))
