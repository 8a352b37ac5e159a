"""The user-facing pipeline: photos -> a personalised SDXL pipeline, in either world.

    personalized = PersonalizedPipeline(pipe, hyperlora, conditioner)
    result = personalized.personalize(["me1.jpg", "me2.jpg"], id_scale=0.85)   # once per identity
    image = personalized("a portrait of a person in a spacesuit").images[0]     # plain SDXL speed

Personalisation runs face analysis, CLIP, the hypernetwork and LoRA fusing once; generation is
the unchanged diffusers pipeline with the LoRA fused into its UNet weights (`InPlaceFusion`: zero
per-step overhead, exact restore). `fuse=False` loads diffusers adapters instead (PEFT modules,
scales changeable with `pipe.set_adapters`, a small cost per step).
The trigger words are prepended to every prompt that lacks them (the LoRA is inert without them).
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .conditioning.references import Conditioner, ReferenceFeatures
from .export import save_lora
from .hypernet import HyperLoRA
from .lora import InPlaceFusion, LoRAWeights, load_into_diffusers


@dataclass
class Personalization:
    """The LoRAs of one identity, the features they came from, and what each step cost."""

    loras: dict[str, LoRAWeights]
    features: ReferenceFeatures
    scales: dict[str, float]
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_hash: str = ""


def with_trigger(prompt: str, trigger_words: str) -> str:
    """`trigger_words, prompt` unless the prompt already starts with them."""
    if not trigger_words or prompt.startswith(trigger_words):
        return prompt
    return f"{trigger_words}, {prompt}"


class PersonalizedPipeline:
    """A diffusers SDXL pipeline plus the hypernetwork and conditioner that personalise it."""

    def __init__(self, pipe, hyperlora: HyperLoRA, conditioner: Conditioner):
        self.pipe, self.hyperlora, self.conditioner = pipe, hyperlora, conditioner
        self.current: Personalization | None = None
        self.fusion = InPlaceFusion(pipe.unet)
        self._adapters = False

    @property
    def trigger_words(self) -> str:
        return self.hyperlora.config.trigger_words

    @torch.no_grad()
    def personalize(self, images, *, id_scale: float = 0.85, base_scale: float = 0.0, fuse: bool = True) -> Personalization:
        """Photos of one person -> LoRAs loaded (and fused) into the pipeline's UNet."""
        timings = {}
        start = time.perf_counter()
        features = self.conditioner(images)
        timings["conditioning"] = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        parameter = next(self.hyperlora.parameters())
        kwargs = {k: (v.to(parameter.device, parameter.dtype) if torch.is_tensor(v) and v.is_floating_point() else v)
                  for k, v in features.generate_kwargs().items()}  # fmt: skip
        if base_scale == 0 or not self.hyperlora.config.has_base_lora:
            kwargs["clip_blurred"] = None
        loras = self.hyperlora.generate(**kwargs)
        timings["hypernetwork"] = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        scales = {"id": id_scale, "base": base_scale} if "base" in loras else {"id": id_scale}
        self._clear()
        if fuse:
            self.fusion.fuse([loras[b] for b in scales], list(scales.values()))
        else:
            load_into_diffusers(self.pipe, loras, scales)
            self._adapters = True
        timings["load_and_fuse"] = 1000 * (time.perf_counter() - start)
        timings["total"] = sum(timings.values())
        source_hash = hashlib.sha256("".join(features.hashes).encode()).hexdigest()
        self.current = Personalization(loras, features, scales, timings, source_hash)
        return self.current

    def _clear(self) -> None:
        self.fusion.restore()
        if self._adapters:
            self.pipe.unload_lora_weights()
            self._adapters = False

    def reset(self) -> None:
        """Back to the base model exactly: restore the fused weights, drop any adapters."""
        self._clear()
        self.current = None

    def __call__(self, prompt: str | list[str], **kwargs):
        if self.current is None:
            raise RuntimeError("call personalize(images) first (or use .pipe for the base model)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.pipe([with_trigger(p, self.trigger_words) for p in prompts], **kwargs)

    def save_lora(self, path: str | Path, *, branch: str = "id", format: str = "kohya", seed: int | None = None) -> Path:
        """The current identity's LoRA as a file ComfyUI / A1111 / kohya / diffusers can load."""
        if self.current is None:
            raise RuntimeError("nothing to save: call personalize(images) first")
        return save_lora(path, self.current.loras[branch], format=format, config=self.hyperlora.config.to_dict(),
                         source_images_sha256=self.current.source_hash, seed=seed,
                         extra_metadata={"scale": self.current.scales[branch]})  # fmt: skip
