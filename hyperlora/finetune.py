"""HyperLoRA-initialised fine-tuning: a generated ID LoRA as the start of a short DreamBooth-style tune.

The official README says a generated LoRA is a good start for a short fine-tune (about 50 steps); no code was
released. Here the ID LoRA's lora_down and lora_up become trainable tensors, started from the generated values
(init="hyperlora") or as PEFT starts a LoRA (init="zero": lora_up zero, lora_down Kaiming-uniform, the
DreamBooth-LoRA baseline), and AdamW trains them on the references with the diffusion loss. The LoRA reaches the
UNet through `functional_lora`'s forward hooks, so the UNet's weights are never written and its requires_grad
flags are restored. The result is plain `LoRAWeights`: fuse it, or write it with `export.save_lora`.

    pipe = HyperLoRAPipeline.from_pretrained("toy", checkpoint="runs/train/x/stage3/hyperlora")
    pipe.personalize(photos)
    result = finetune(pipe, photos, FinetuneConfig(steps=50))  # pipe now holds the tuned LoRA, fused
    pipe.save_lora("me_ft.safetensors")
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .diffusion import diffusion_loss
from .generate import WorldOptions
from .lora import LoRAWeights, functional_lora

INITS = ("hyperlora", "zero")
INSTANCE_PROMPT = "a portrait of a person"  # after the trigger words, as the release's examples word it


@dataclass(kw_only=True)
class FinetuneConfig:
    """One fine-tune of one identity's ID LoRA (also the flags of `python -m hyperlora finetune`)."""

    steps: int = field(default=50, metadata={"help": "optimiser steps (the official README: about 50)"})
    lr: float = field(default=1e-4, metadata={"help": "AdamW learning rate of lora_down and lora_up (untuned)"})
    seed: int = field(default=0, metadata={"help": "the zero init, the batches, noise and timesteps"})
    init: str = field(default="hyperlora", metadata={"help": "hyperlora: from the generated LoRA; zero: lora_up 0, "
                                                             "lora_down random (PEFT's), the DreamBooth baseline",
                                                     "choices": INITS})  # fmt: skip
    scale: float | None = field(default=None, metadata={"help": "LoRA weight while training, the one to use the "
                                                                "result at (default: the ID weight)"})  # fmt: skip
    batch_size: int = field(default=0, metadata={"help": "references per step (0: all of them)"})
    snr_gamma: float | None = field(default=None, metadata={"help": "Min-SNR-gamma weighting (default: plain MSE)"})
    size: int | None = field(default=None, metadata={"help": "training side in px (default: the world's image size)"})

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {self.init!r}")
        if self.steps < 0 or self.batch_size < 0:
            raise ValueError(f"steps and batch_size must be >= 0, got {self.steps} and {self.batch_size}")


@dataclass
class FinetuneResult:
    lora: LoRAWeights  # the tuned ID LoRA, batch 1, in the start's dtype
    losses: list[float]  # the training loss of every step
    seconds: float  # wall time of encoding the references and training
    config: FinetuneConfig  # with `scale` resolved
    prompts: list[str] = field(default_factory=list)  # the prompt of each reference trained on, as sent


# --- the start ---------------------------------------------------------------------------------


def zero_lora(shapes: dict[str, tuple[int, int]], rank: int, alpha: float, seed: int = 0) -> LoRAWeights:
    """PEFT's LoRA init for {path: (in, out)}: lora_up zero, lora_down Kaiming-uniform (a = sqrt(5), bound
    1 / sqrt(in)), so the update starts at zero but its gradient does not (Hu et al. 2021, section 4.1)."""
    generator = torch.Generator().manual_seed(seed)
    layers = {}
    for path, (fan_in, fan_out) in shapes.items():
        down = (torch.rand(1, rank, fan_in, generator=generator) * 2 - 1) / math.sqrt(fan_in)
        layers[path] = (down, torch.zeros(1, fan_out, rank))
    return LoRAWeights(layers, rank, alpha)


def lora_shapes(lora: LoRAWeights) -> dict[str, tuple[int, int]]:
    """{path: (in, out)} of every adapted linear."""
    return {path: (down.shape[-1], up.shape[-2]) for path, (down, up) in lora.layers.items()}


def start_lora(config: FinetuneConfig, generated: LoRAWeights) -> LoRAWeights:
    """The generated LoRA (init="hyperlora"), or a PEFT-initialised one of its shapes, rank and alpha ("zero")."""
    if config.init == "hyperlora":
        return generated
    zero = zero_lora(lora_shapes(generated), generated.rank, generated.alpha, config.seed)
    first = next(iter(generated.layers.values()))[0]
    return zero.to(first.device, first.dtype)


# --- the references ----------------------------------------------------------------------------


def _pixels(image, size: int) -> torch.Tensor:
    """A photo (path, PIL image, uint8 array) -> its centre square at `size`, [3, size, size] in [-1, 1]."""
    from .conditioning.images import load_image

    image = load_image(image)
    if image.size != (size, size):
        image = ImageOps.fit(image, (size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1


@torch.no_grad()
def reference_batch(pipe, images: Sequence, prompts: str | Sequence[str], size: int) -> dict:
    """References and their prompts -> the UNet loss's inputs, once (VAE and text encoders are frozen): scaled
    VAE latents (the posterior mean), the prompts' text states, pooled embeddings and SDXL's size conditioning."""
    prompts = [prompts] * len(images) if isinstance(prompts, str) else list(prompts)
    if len(prompts) != len(images):
        raise ValueError(f"{len(images)} reference images but {len(prompts)} prompts")
    vae, device = pipe.vae, pipe.unet.device
    upcast = vae.dtype == torch.float16 and getattr(vae.config, "force_upcast", False)  # SDXL's VAE overflows in fp16
    if upcast:
        vae.to(torch.float32)
    try:
        pixels = torch.stack([_pixels(image, size) for image in images]).to(device, vae.dtype)  # [N, 3, size, size]
        latents = vae.encode(pixels).latent_dist.mean * vae.config.scaling_factor
    finally:
        if upcast:
            vae.to(torch.float16)  # fp16 -> fp32 -> fp16 is exact: the VAE is as it was
    latents = latents.to(pipe.unet.dtype)
    unique = list(dict.fromkeys(prompts))
    embeds, _, pooled, _ = pipe.encode_prompt(unique, device=device, num_images_per_prompt=1,
                                              do_classifier_free_guidance=False)  # fmt: skip
    rows = [unique.index(p) for p in prompts]
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=latents.dtype, device=device)  # orig, crop, target
    return {"latents": latents, "encoder_hidden_states": embeds[rows].to(latents.dtype),
            "text_embeds": pooled[rows].to(latents.dtype), "time_ids": time_ids.repeat(len(images), 1)}  # fmt: skip


# --- training ----------------------------------------------------------------------------------


@contextlib.contextmanager
def frozen(unet: torch.nn.Module):
    """The UNet's parameters without gradients for the block, their requires_grad flags restored after it."""
    flags = [(p, p.requires_grad) for p in unet.parameters()]
    unet.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in flags:
            p.requires_grad_(flag)


class LoRAFinetuner:
    """AdamW on one LoRA's lora_down and lora_up (float32 copies) under a frozen UNet; `train(n)` continues where
    the previous call stopped, so cumulative step counts can be scored along one run. `fixed` holds
    (LoRAWeights, scale) pairs applied unchanged beside it (a Base-LoRA)."""

    def __init__(self, unet, noise_scheduler, batch: dict, start: LoRAWeights, config: FinetuneConfig, *,
                 fixed: Sequence[tuple[LoRAWeights, float]] = ()):  # fmt: skip
        if start.batch_size != 1:
            raise ValueError(f"fine-tuning takes one identity's LoRA (batch 1), got batch {start.batch_size}")
        self.unet, self.scheduler, self.batch, self.config = unet, noise_scheduler, batch, config
        self.scale = 1.0 if config.scale is None else config.scale
        self.fixed = list(fixed)
        self.rank, self.alpha, self.dtype = start.rank, start.alpha, next(iter(start.layers.values()))[0].dtype
        self.start_trainable(start, unet.device)
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=config.lr, weight_decay=0.0)  # no decay: a prior
        self.generator = torch.Generator().manual_seed(config.seed + 1)  # batches, noise, timesteps
        self.losses: list[float] = []

    def start_trainable(self, start: LoRAWeights, device: torch.device) -> None:
        """float32 copies of the start's lora_down and lora_up, the tensors that train."""
        self.layers = {path: tuple(t.detach().to(device, torch.float32).clone().requires_grad_() for t in pair)
                       for path, pair in start.layers.items()}  # fmt: skip

    def parameters(self) -> list[torch.Tensor]:
        """The tensors the optimiser trains."""
        return [t for pair in self.layers.values() for t in pair]

    def current(self) -> LoRAWeights:
        """The LoRA being trained, float32, with gradients to the trained tensors."""
        return LoRAWeights(self.layers, self.rank, self.alpha)

    @property
    def lora(self) -> LoRAWeights:
        """The current LoRA, detached, in the start's dtype."""
        with torch.no_grad():
            current = self.current()
        layers = {path: (d.detach().to(self.dtype), u.detach().to(self.dtype)) for path, (d, u) in current.layers.items()}
        return LoRAWeights(layers, current.rank, current.alpha)

    def loss(self, generator: torch.Generator, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The diffusion loss of the references (or the given rows) with the current LoRA applied."""
        batch = self.batch if rows is None else {k: v[rows.to(v.device)] for k, v in self.batch.items()}
        loras = [self.current(), *(lora for lora, _ in self.fixed)]
        with functional_lora(self.unet, loras, [self.scale, *(scale for _, scale in self.fixed)]):
            return diffusion_loss(self.unet, self.scheduler, batch, generator, self.config.snr_gamma)

    def train(self, steps: int, *, progress: bool = True) -> list[float]:
        """`steps` more optimiser steps; returns their losses."""
        from tqdm.auto import tqdm

        n, size = len(self.batch["latents"]), self.config.batch_size
        with frozen(self.unet), torch.enable_grad():
            for _ in tqdm(range(steps), desc="fine-tuning", unit="step", disable=not progress or steps < 2):
                rows = torch.randperm(n, generator=self.generator)[:size] if 0 < size < n else None
                loss = self.loss(self.generator, rows)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.optimizer.step()
                self.losses.append(loss.item())
        return self.losses[len(self.losses) - steps :]


def noise_scheduler(pipe):
    """The DDPM training schedule of a pipeline's own scheduler config (the toy UNet predicts v, SDXL epsilon)."""
    from diffusers import DDPMScheduler

    return DDPMScheduler.from_config(pipe.scheduler.config)


def training_size(pipe, config: FinetuneConfig, defaults: dict | None = None) -> int:
    """The configured side, else the world's image size, else the UNet's default (1024 for SDXL)."""
    return config.size or (defaults or {}).get("height") or pipe.unet.config.sample_size * pipe.vae_scale_factor


# --- on a HyperLoRAPipeline --------------------------------------------------------------------


def used_indices(images: Sequence, sources: Sequence[str]) -> list[int]:
    """Which images the conditioner used (`ReferenceFeatures.sources`): skipped photos are not trained on."""
    from .conditioning.references import _name

    used = set(sources)
    return [index for index, image in enumerate(images) if _name(image, index) in used]


def finetune(pipe, images: Sequence, config: FinetuneConfig | None = None, *, personalization=None,
             captions: Sequence[str] | None = None, progress: bool = True) -> FinetuneResult:  # fmt: skip
    """Fine-tune the ID LoRA of `images` (`personalization`, else the pipeline's current one, else a new one) on
    the images the conditioner used, with "<trigger words>, a portrait of a person" or each image's caption; then
    make the tuned LoRA the pipeline's current one (fused), so `pipe(...)` and `pipe.save_lora` use it."""
    from .pipeline import Personalization, _rounded

    config = config or FinetuneConfig()
    result = personalization or pipe.current or pipe.personalize(images)
    scales = {**result.scales, "id": result.scales["id"] if config.scale is None else config.scale}
    config = dataclasses.replace(config, scale=scales["id"])
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(images)} images but {len(captions)} captions")
    used = used_indices(images, result.features.sources)
    prompts = [pipe.prompt_as_sent(captions[i]) for i in used] if captions else pipe.prompt_as_sent(INSTANCE_PROMPT)
    pipe.reset()  # the base weights, exactly: training adds the LoRA through hooks
    start = time.perf_counter()
    size = training_size(pipe.pipe, config, pipe.defaults)
    batch = reference_batch(pipe.pipe, [images[i] for i in used], prompts, size)
    fixed = [(result.loras[b], s) for b, s in scales.items() if b != "id" and s]
    tuner = LoRAFinetuner(pipe.pipe.unet, noise_scheduler(pipe.pipe), batch, start_lora(config, result.loras["id"]),
                          config, fixed=fixed)  # fmt: skip
    tuner.train(config.steps, progress=progress)
    seconds = time.perf_counter() - start
    tuned = tuner.lora if pipe.export_dtype is None else _rounded(tuner.lora, pipe.export_dtype)
    timings = {**result.timings_ms, "finetune": 1000 * seconds}
    pipe.apply(Personalization({**result.loras, "id": tuned}, result.features, scales, timings, result.source_hash))
    prompts = [prompts] * len(used) if isinstance(prompts, str) else prompts
    return FinetuneResult(tuned, list(tuner.losses), seconds, config, prompts)


# --- python -m hyperlora finetune --------------------------------------------------------------


@dataclass(kw_only=True)
class FinetuneCommand(FinetuneConfig, WorldOptions):
    """The flags of `python -m hyperlora finetune`: the world's, the fine-tune's and the outputs'."""

    out: str = field(default="", metadata={"help": "output folder (new, or --overwrite)", "required": True})
    caption: list[str] = field(default_factory=list, metadata={"help": "one per --face (default: the trigger "
                                                                       f"words, {INSTANCE_PROMPT!r})"})  # fmt: skip
    prompt: list[str] = field(default_factory=list, metadata={"help": "prompts to sample before and after"})
    num_images: int = field(default=1, metadata={"help": "images per prompt, at seeds seed, seed + 1, ..."})
    sample_steps: int | None = field(default=None, metadata={"help": "sampling steps (default: the world's)"})
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --out"})


def run_finetune(config: FinetuneCommand, argv: list[str] | None = None) -> Path:
    """Personalise from the photos, fine-tune the ID LoRA, write --out all at once:
    id_lora_{kohya,diffusers}.safetensors (tuned), record.json, and for --prompt images/finetuned/*.png (and
    images/hyperlora/*.png, the generated LoRA before tuning, with init hyperlora)."""
    from .export import FORMATS
    from .generate import _versions, load_for, personalize, staged_folder

    out = Path(config.out or "")
    if not config.out:
        raise ValueError("finetune needs --out")
    if config.caption and len(config.caption) != len(config.face):
        raise ValueError(f"{len(config.caption)} --caption for {len(config.face)} --face photos: give one each")
    pipe, loading_ms = load_for(config, out)
    with staged_folder(out) as tmp:
        result = personalize(pipe, config)
        images = _samples(pipe, config, tmp, "hyperlora") if config.init == "hyperlora" else []
        ft_config = FinetuneConfig(**{f.name: getattr(config, f.name) for f in dataclasses.fields(FinetuneConfig)})
        tuned = finetune(pipe, config.face, ft_config, personalization=result, captions=config.caption or None)
        images += _samples(pipe, config, tmp, "finetuned")
        final_loss = tuned.losses[-1] if tuned.losses else None
        metadata = {"finetune": dataclasses.asdict(tuned.config), "finetune_final_loss": final_loss,
                    "label": pipe.label}  # fmt: skip
        loras = {format: pipe.save_lora(tmp / f"id_lora_{format}.safetensors", format=format, seed=config.seed,
                                        extra_metadata=metadata).name for format in FORMATS}  # fmt: skip
        features = pipe.current.features
        record = {"command": shlex.join(["python", "-m", "hyperlora", *(sys.argv[1:] if argv is None else argv)]),
                  "config": dataclasses.asdict(config), "versions": _versions(), "label": pipe.label,
                  "world": config.world, "checkpoint": {"path": config.checkpoint or None,
                                                        "hyperlora_config": pipe.hyperlora.config.to_dict()},
                  "trigger_words": pipe.trigger_words, "references": list(features.sources),
                  "skipped": dict(features.failures), "warnings": list(features.warnings),
                  "training_prompts": tuned.prompts, "init": config.init, "steps": config.steps, "lr": config.lr,
                  "scale": tuned.config.scale, "losses": tuned.losses, "seconds": round(tuned.seconds, 3),
                  "loras": loras, "images": images, "source_images_sha256": result.source_hash,
                  "timings": {"loading_ms": round(loading_ms, 2),
                              **{f"{k}_ms": round(v, 2) for k, v in pipe.current.timings_ms.items()}}}  # fmt: skip
        (tmp / "record.json").write_text(json.dumps(record, indent=2) + "\n")
    return out


def _samples(pipe, config: FinetuneCommand, folder: Path, kind: str) -> list[dict]:
    """Every --prompt at seeds seed .. seed + num_images - 1 with the pipeline's current LoRA: images/<kind>/."""
    kwargs = dict(pipe.defaults) | ({"num_inference_steps": config.sample_steps} if config.sample_steps else {})
    (folder / "images" / kind).mkdir(parents=True, exist_ok=True)
    images = []
    for p, prompt in enumerate(config.prompt):
        for seed in range(config.seed, config.seed + config.num_images):
            name = f"images/{kind}/p{p:02d}_s{seed}.png"
            pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs).images[0].save(folder / name)
            images.append({"file": name, "lora": kind, "prompt": prompt, "prompt_as_sent": pipe.prompt_as_sent(prompt),
                           "seed": seed})  # fmt: skip
    return images
