"""The user-facing pipeline: photos -> a personalised SDXL pipeline, in either world.

    pipe = HyperLoRAPipeline.from_pretrained(world="toy", checkpoint="runs/train/x/stage3/hyperlora")
    result = pipe.personalize(["me1.jpg", "me2.jpg"])   # once per identity, at the checkpoint's ID weight
    image = pipe("a portrait of a person in a spacesuit").images[0]      # plain SDXL speed
    pipe.save_lora("me.safetensors")                                    # kohya, for ComfyUI / A1111

Personalisation runs face analysis, CLIP, the hypernetwork and LoRA fusing once; generation is the
unchanged diffusers pipeline (any SDXL pipeline, ControlNet ones included) with the LoRA fused into its
UNet weights (`InPlaceFusion`: zero per-step overhead, exact restore). `fuse=False` loads diffusers
adapters instead (PEFT modules, scales changeable with `pipe.set_adapters`, a small cost per step).
The LoRAs are rounded to the export dtype (float16, as the release's Save-LoRA node writes them) before
they are applied, so a saved file reproduces the images exactly (float32 on a CPU). The trigger words are prepended to
every prompt that lacks them (the LoRA is inert without them).
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .checkpoint import RELEASE_ID_WEIGHT
from .conditioning.references import Conditioner, ReferenceFeatures
from .export import save_lora
from .hypernet import HyperLoRA
from .lora import InPlaceFusion, LoRAWeights, load_into_diffusers

EXPORT_DTYPE = torch.float16  # LoRA files, as the official Save-LoRA node writes them


@dataclass
class Personalization:
    """The LoRAs of one identity, the features they came from, and what each step cost."""

    loras: dict[str, LoRAWeights]
    features: ReferenceFeatures
    scales: dict[str, float]
    timings_ms: dict[str, float] = field(default_factory=dict)
    source_hash: str = ""

    @property
    def warnings(self) -> list[str]:
        """Per-photo warnings (several faces, a small face, ...) of the photos that were used."""
        return list(self.features.warnings)

    @property
    def skipped(self) -> dict[str, str]:
        """Photos that could not be used -> why."""
        return dict(self.features.failures)


def with_trigger(prompt: str, trigger_words: str) -> str:
    """`trigger_words, prompt` unless the prompt already starts with them."""
    if not trigger_words or prompt.startswith(trigger_words):
        return prompt
    return f"{trigger_words}, {prompt}"


class HyperLoRAPipeline:
    """A diffusers SDXL pipeline plus the hypernetwork and conditioner that personalise it.

    `defaults` are keyword arguments every call gets unless it passes its own (a world's steps, guidance,
    negative prompt and size: see `hyperlora.worlds.Sampling`). `id_weight` is `personalize`'s default ID-LoRA
    weight: the checkpoint's recommended one (`hyperlora.checkpoint.recommended_id_weight`).
    """

    def __init__(self, pipe, hyperlora: HyperLoRA, conditioner: Conditioner, *, defaults: dict | None = None,
                 export_dtype: torch.dtype | None = EXPORT_DTYPE, label: str = "",
                 id_weight: float = RELEASE_ID_WEIGHT):  # fmt: skip
        self.pipe, self.hyperlora, self.conditioner = pipe, hyperlora, conditioner
        self.id_weight = id_weight
        self.defaults, self.export_dtype, self.label = dict(defaults or {}), export_dtype, label
        self.current: Personalization | None = None
        self.fusion = InPlaceFusion(pipe.unet)
        self._adapters = False

    @classmethod
    def from_pretrained(cls, world: str = "toy", *, checkpoint=None, pipeline=None, clip=None, insightface_root=None,
                        face_backend: str | None = None, controlnet=None, scheduler: str | None = None,
                        device: str | torch.device = "cpu", dtype: torch.dtype | str = torch.float32,
                        **conditioner_options) -> HyperLoRAPipeline:  # fmt: skip
        """Assemble a world: its base pipeline, a HyperLoRA checkpoint and the conditioner (`hyperlora.worlds`).

        toy: every path defaults to data/toy (the checkpoint to data/toy/hyperlora); sdxl: pass `pipeline` (a
        diffusers SDXL folder), `clip` (ViT-L/14), `checkpoint` and `insightface_root` (antelopev2).
        controlnet: a diffusers ControlNetModel (or its folder) to wrap the pipeline in
        StableDiffusionXLControlNetPipeline. scheduler: a `hyperlora.schedulers` name (default DPM++ 2M Karras).
        conditioner_options: `Conditioner` keywords (pick, min_face_size, grayscale, remove_background).
        """
        from .schedulers import DEFAULT_SCHEDULER, set_scheduler
        from .worlds import load_world

        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
        world_parts = load_world(world, checkpoint=checkpoint, pipeline=pipeline, clip=clip, device=device,
                                 insightface_root=insightface_root, face_backend=face_backend, dtype=dtype)  # fmt: skip
        pipe = world_parts.pipe
        if controlnet is not None:
            pipe = with_controlnet(pipe, controlnet, dtype=dtype, device=device)
        set_scheduler(pipe, scheduler or DEFAULT_SCHEDULER)
        if world == "toy":
            from .worlds.toy import TOY_MIN_FACE_SIZE

            conditioner_options.setdefault("min_face_size", TOY_MIN_FACE_SIZE)
        conditioner = Conditioner(world_parts.analyzer, world_parts.clip, **conditioner_options)
        return cls(pipe, world_parts.hyperlora, conditioner, defaults=world_parts.sampling.call_kwargs(),
                   label=world_parts.label, id_weight=world_parts.id_weight)  # fmt: skip

    @property
    def trigger_words(self) -> str:
        return self.hyperlora.config.trigger_words

    def prompt_as_sent(self, prompt: str) -> str:
        """The prompt the pipeline receives: with the trigger words in front."""
        return with_trigger(prompt, self.trigger_words)

    @torch.no_grad()
    def personalize(
        self, images, *, id_scale: float | None = None, base_scale: float = 0.0, fuse: bool = True
    ) -> Personalization:
        """Photos of one person (paths, PIL images, numpy arrays, file bytes) -> LoRAs applied to the pipeline's UNet.

        id_scale: the ID-LoRA weight; None: the checkpoint's recommended one (`self.id_weight`; the release's 0.85).

        Photos that cannot be used are skipped (`.skipped`: photo -> reason) and doubtful ones noted (`.warnings`),
        as the conditioner reports them; NoUsableReferenceError when none is usable.
        """
        if base_scale and not self.hyperlora.config.has_base_lora:
            raise ValueError(f"base_scale={base_scale}: this HyperLoRA has no Base-LoRA (config.has_base_lora is "
                             "False, as in the release); use base_scale=0")  # fmt: skip
        timings = {}
        start = time.perf_counter()
        with _toggled(self.conditioner, "with_base", bool(base_scale)):
            features = self.conditioner(images)  # warns about each skipped photo and each doubtful one
        timings["conditioning"] = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        kwargs = features.generate_kwargs()  # HyperLoRA.generate casts them to its own dtype and device
        if not base_scale:
            kwargs["clip_blurred"] = None
        loras = self.hyperlora.generate(**kwargs)
        if self.export_dtype is not None:  # the precision of the files save_lora writes, so they reproduce the images
            loras = {branch: _rounded(lora, self.export_dtype) for branch, lora in loras.items()}
        timings["hypernetwork"] = 1000 * (time.perf_counter() - start)
        start = time.perf_counter()
        id_scale = self.id_weight if id_scale is None else id_scale
        scales = {"id": id_scale, "base": base_scale} if "base" in loras else {"id": id_scale}
        source_hash = hashlib.sha256("".join(features.hashes).encode()).hexdigest()
        self.apply(Personalization(loras, features, scales, timings, source_hash), fuse=fuse)
        timings["load_and_fuse"] = 1000 * (time.perf_counter() - start)
        timings["total"] = sum(timings.values())
        return self.current

    def apply(self, personalization: Personalization, *, fuse: bool = True) -> None:
        """Make `personalization` the current identity: its LoRAs at its scales fused into the UNet's weights
        (or loaded as diffusers adapters), replacing whatever was applied before (a fine-tuned LoRA, say)."""
        self._clear()
        loras, scales = personalization.loras, personalization.scales
        if fuse:
            self.fusion.fuse([loras[b] for b in scales], list(scales.values()))
        else:
            load_into_diffusers(self.pipe, {b: loras[b] for b in scales}, scales)
            self._adapters = True
        self.current = personalization

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
        """The wrapped pipeline's call with the trigger words added and the world's defaults filled in."""
        if self.current is None:
            raise RuntimeError("call personalize(images) first (or use .pipe for the base model)")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        return self.pipe([self.prompt_as_sent(p) for p in prompts], **{**self.defaults, **kwargs})

    def save_lora(self, path: str | Path, *, branch: str = "id", format: str = "kohya", seed: int | None = None,
                  extra_metadata: dict | None = None) -> Path:  # fmt: skip
        """The current identity's LoRA as a file ComfyUI / A1111 / kohya (format="kohya") or diffusers
        (format="diffusers", `load_lora_weights`) can load, with its provenance in the metadata."""
        if self.current is None:
            raise RuntimeError("nothing to save: call personalize(images) first")
        if branch not in self.current.loras:
            raise ValueError(f"no {branch!r} LoRA in this personalisation; have {sorted(self.current.loras)}")
        metadata = {"scale": self.current.scales[branch], "trigger_words": self.trigger_words, **(extra_metadata or {})}
        return save_lora(path, self.current.loras[branch], format=format, config=self.hyperlora.config.to_dict(),
                         dtype=self.export_dtype or torch.float16, source_images_sha256=self.current.source_hash,
                         seed=seed, extra_metadata=metadata)  # fmt: skip


PersonalizedPipeline = HyperLoRAPipeline  # the name before issue 18; eval and training previews use it


def with_controlnet(pipe, controlnet, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """`pipe` (StableDiffusionXLPipeline) as a StableDiffusionXLControlNetPipeline sharing its components."""
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    if isinstance(controlnet, (str, Path)):
        controlnet = ControlNetModel.from_pretrained(controlnet, local_files_only=True, dtype=dtype)
    if controlnet.dtype != dtype:
        controlnet = controlnet.to(dtype=dtype)
    return StableDiffusionXLControlNetPipeline.from_pipe(pipe, controlnet=controlnet.to(device))


def _rounded(lora: LoRAWeights, dtype: torch.dtype) -> LoRAWeights:
    """`lora` as the exported files hold it: lora_down rounded to `dtype`, lora_up rounded with alpha / r folded in
    (as the diffusers file stores it). With alpha / r a power of two (0.5, the release's) both files hold exactly
    these values, so either reproduces the images."""
    layers = {path: (down.to(dtype).to(down.dtype), (up * lora.scale).to(dtype).to(up.dtype) / lora.scale)
              for path, (down, up) in lora.layers.items()}  # fmt: skip
    return LoRAWeights(layers, lora.rank, lora.alpha)


@contextlib.contextmanager
def _toggled(obj, attribute: str, value):
    """Set `obj.attribute` to `value` for the block (the conditioner computes Base features only when needed)."""
    before = getattr(obj, attribute)
    setattr(obj, attribute, value)
    try:
        yield
    finally:
        setattr(obj, attribute, before)
