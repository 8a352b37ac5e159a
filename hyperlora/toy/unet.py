"""The toy base model's UNet: an SDXL-architecture UNet2DConditionModel trained on toy portraits.

SDXL's layout at toy scale: level 0 without attention, then CrossAttn levels (every one holds the
attention modules that HyperLoRA later adapts); `text_time` added conditioning from the second
text encoder's pooled projection and the six time ids (original size, crop corner, target size);
cross-attention over both encoders' penultimate hidden states, concatenated (2 x the toy CLIP's
text width). Training follows SDXL's scaled_linear DDPM schedule, with captions dropped to "" 10 % of the
time for classifier-free guidance, but predicts v (Salimans & Ho 2022, as SD 2.x) instead of SDXL's epsilon:
see `UNetTrainConfig.prediction_type`. The assembled pipeline's scheduler is told which (`assemble_pipeline`).

The frozen parts are run once: a rendered set's VAE latent distributions and its captions' text
states (through the pipeline's own `encode_prompt`, so training sees what sampling sees) are cached
in memory, and each step only draws a latent sample, noise and a timestep.
"""

from __future__ import annotations

import json
import logging
import math
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..config import strict_from_dict
from ..diffusion import diffusion_loss
from ..targets import find_targets
from ..train.resume import CURVE_FILE, GeneratorState, curve_seconds, run_logged_steps
from .cards import read_model_card, write_model_card
from .data import ToyPortraits, render_arrays, to_tensor
from .identity import nonsense_prefix, split_identities
from .pipeline import NOISE_SCHEDULE, make_pipeline, text_components, toy_vae

logger = logging.getLogger(__name__)

LOSSES_FILE = CURVE_FILE  # the loss curve, one mean per logging window


@dataclass
class UNetTrainConfig:
    """Architecture, data and optimisation of the toy UNet; saved in its model card."""

    # Architecture (SDXL layout: DownBlock2D, then CrossAttn levels; up blocks mirror them).
    block_out_channels: tuple[int, ...] = (64, 64, 128)  # channels per level; 3 levels as SDXL's (320, 640, 1280).
    # Level 0 (16 x 16 latents, where the face is drawn) at 64, not 32 (before): at 32 a full-rank fine-tune of
    # HyperLoRA's target linears carried one person to 0.11-0.13 ID similarity in 300 steps and the base model read
    # 0.836 on its attribute gate; at 64, 0.256 (all prompts) / 0.343 (neutral) and 0.891, with clearer faces
    # (`python -m eval.carry --train targets --steps 300 --ids 0 --unet DIR`; README, check 0)
    layers_per_block: int = 2  # resnets (and transformers) per down level, as SDXL; up levels get one more
    transformer_layers_per_block: tuple[int, ...] = (1, 1, 1)  # per level; level 0 has no attention (SDXL: 1, 2, 10)
    top_level_attention: bool = True  # cross-attention at level 0 (16 x 16 latents) too, unlike SDXL's layout. SDXL's
    # first attention level sees a face at 64 x 64 latents, ~20 px wide; without level-0 attention the toy face is
    # at most 3 latent px wide where attention (and so every LoRA of HyperLoRA's targets) reaches it. Issue 17's
    # check 0 without it: a DreamBooth LoRA on the attention linears read at best 0.19 ID similarity (rank 16,
    # 1,600 steps, 8 references), while fine-tuning the whole UNet read 0.68-0.75. With it the same LoRA (rank 4)
    # read 0.163 after 1,000 steps (0.151 before): reach alone was not the limit (README). It costs ~60 % more UNet
    # time and did not lift the base model's gate (0.836 against 0.853). Before: False.
    attention_heads: tuple[int, ...] = (4, 4, 8)  # heads per level, 16 wide (diffusers' name: attention_head_dim)
    addition_time_embed_dim: int = 32  # sinusoidal width per time id; 6 ids (SDXL: 256)
    # Data: a fixed rendered set of training identities, cached as VAE latents and text states.
    num_identities: int = 2000  # training identities (ids 0..n-1 of split_identities("train"))
    images_per_identity: int = 4  # looks per identity: num_identities x this images in all
    data_seed: int = 0  # seed of the rendered set (ToyPortraits seed)
    image_size: int = 64  # render size; latents are image_size / 4
    # Optimisation.
    steps: int = 9000  # optimiser steps. At batch 32, 4,500 steps (34 min on one thread) read 0.809 on the base
    # model's gate and 9,000 read 0.858 but cost 77 min; a batch-16 step is 1.6-1.7x cheaper (3.5-3.7 against
    # 2.2 steps/s on one idle thread, eval/bench_unet.py), so 9,000 of them fit the 90-minute build with the core
    # the faces step frees: 36 min in the build, 0.853 on the gate (README)
    batch_size: int = 16
    lr: float = 6e-4  # AdamW peak learning rate (small UNets take larger rates than SDXL's 1e-5)
    warmup_steps: int = 200  # linear warmup, then cosine decay to 0
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max gradient norm
    caption_dropout: float = 0.1  # share of captions replaced by "" (classifier-free guidance)
    nonsense_prefix_prob: float = 0.3  # share of captions given 1-3 rare meaningless words in front
    # (identity.nonsense_prefix): HyperLoRA's trigger words are such words, which the toy text towers never saw; with
    # none in training (0.0, the models before this setting), "fcsks fxhks fhyks, " before a prompt cut the base
    # model's adherence from 0.834 to 0.528 (python -m hyperlora.toy diagnose trigger)
    snr_gamma: float | None = 5.0  # Min-SNR loss weighting (Hang et al. 2023); None: plain MSE
    prediction_type: str = "v_prediction"  # or "epsilon" (SDXL's). An epsilon UNet trained with this recipe
    # predicted x0 worse than the all-zeros guess at t = 950 (MSE 1.19 on unit-variance latents: its small noise
    # errors are multiplied by 1 / sqrt(alpha_bar) ~ 12 there), so sampling began from a wrong layout and the
    # generations were blotchy; v's x0 error stays bounded at high noise
    ema_decay: float = 0.999  # EMA of the weights that are saved; 0 turns EMA off
    # Runtime.
    threads: int = 1  # torch CPU threads; the build runs two trainers side by side on 2 cores (2 threads each
    # ran up to 9x slower under contention)
    seed: int = 0  # global seed: init, batches, noise, caption dropout
    log_every: int = 50  # steps per loss-curve point and log line
    mixed_precision: str = "no"  # accelerate's setting: "no", "fp16", "bf16"
    init_from: str = ""  # a trained UNet folder (same architecture, or fewer transformer layers per block: the added
    # ones start as the identity, `load_init`) to continue from, with a fresh optimiser and schedule (a
    # longer-trained or deeper UNet without redoing the first run); "": random initialisation
    checkpoint_every: int = 500  # steps between resumable checkpoints in <out>/checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept

    @classmethod
    def smoke(cls, **overrides) -> UNetTrainConfig:
        """Seconds, not minutes: a tiny set and a few steps, to check the plumbing end to end."""
        values = dict(num_identities=8, images_per_identity=2, steps=3, batch_size=4, warmup_steps=1,
                      ema_decay=0.0, log_every=1)  # fmt: skip
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> UNetTrainConfig:
        return strict_from_dict(cls, values)


def build_toy_unet(config: UNetTrainConfig, *, cross_attention_dim: int, pooled_dim: int,
                   latent_channels: int = 4) -> UNet2DConditionModel:
    """A randomly initialised SDXL-layout UNet for `cross_attention_dim` text states, `pooled_dim` text_embeds
    and the VAE's `latent_channels` (SDXL: 4; the toy VAE: 8)."""
    levels = len(config.block_out_channels)
    if levels < 2:
        raise ValueError("the SDXL layout needs at least two levels: one without attention, then CrossAttn ones")
    groups = math.gcd(*config.block_out_channels)  # GroupNorm groups: SDXL's 32, or a divisor of every width
    while groups > 32:
        groups //= 2
    top_down, top_up = (
        ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") if config.top_level_attention else ("DownBlock2D", "UpBlock2D")
    )
    return UNet2DConditionModel(
        sample_size=config.image_size // 4,  # f = 4 toy VAE; the pipeline's default size is sample_size x 4
        in_channels=latent_channels,
        out_channels=latent_channels,
        down_block_types=(top_down,) + ("CrossAttnDownBlock2D",) * (levels - 1),
        up_block_types=("CrossAttnUpBlock2D",) * (levels - 1) + (top_up,),
        block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block,
        attention_head_dim=config.attention_heads,
        transformer_layers_per_block=config.transformer_layers_per_block,
        cross_attention_dim=cross_attention_dim,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=config.addition_time_embed_dim,
        projection_class_embeddings_input_dim=6 * config.addition_time_embed_dim + pooled_dim,
        norm_num_groups=groups,
    )


@dataclass
class TrainingCache:
    """Everything the frozen VAE and text encoders contribute, for a fixed rendered set."""

    latent_mean: torch.Tensor  # [N, C, h, w] VAE posterior mean (unscaled)
    latent_std: torch.Tensor  # [N, C, h, w] VAE posterior std
    prompt_embeds: torch.Tensor  # [N, 77, cross_attention_dim] float16, both encoders' penultimate states
    pooled: torch.Tensor  # [N, pooled_dim] float16, encoder 2's projected pooled output
    empty_embeds: torch.Tensor  # [1, 77, cross_attention_dim] the "" prompt (caption dropout)
    empty_pooled: torch.Tensor  # [1, pooled_dim]
    scaling_factor: float  # the VAE's latent scaling
    captions: list[str] = field(default_factory=list)
    boxes: torch.Tensor | None = None  # [N, 4] ground-truth face boxes x1, y1, x2, y2 in pixels (a ControlNet's input)
    keypoints: torch.Tensor | None = None  # [N, 5, 2] ground-truth eyes, nose tip, mouth corners in pixels

    def __len__(self) -> int:
        return len(self.latent_mean)


@torch.no_grad()
def build_cache(config: UNetTrainConfig, pipe, *, chunk: int = 64, progress: bool = True) -> TrainingCache:
    """Render the training set, encode it with the frozen VAE and its captions with `pipe.encode_prompt`."""
    identities = split_identities("train", max(config.num_identities, 1))
    arrays = render_arrays(ToyPortraits(identities, config.images_per_identity, config.data_seed, config.image_size),
                           progress=progress)  # fmt: skip
    captions = arrays["captions"]
    if config.nonsense_prefix_prob > 0:
        rng = np.random.default_rng([config.data_seed, 17])
        captions = [nonsense_prefix(c, rng) if rng.random() < config.nonsense_prefix_prob else c for c in captions]
    means, stds, embeds, pooled = [], [], [], []
    for start in tqdm(range(0, len(captions), chunk), desc="caching latents and text", disable=not progress):
        images = torch.stack([to_tensor(image) for image in arrays["images"][start : start + chunk]])
        dist = pipe.vae.encode(images).latent_dist
        means.append(dist.mean)
        stds.append(dist.std)
        text = captions[start : start + chunk]
        e, _, p, _ = pipe.encode_prompt(text, device="cpu", do_classifier_free_guidance=False)
        embeds.append(e.half())
        pooled.append(p.half())
    empty, _, empty_pooled, _ = pipe.encode_prompt("", device="cpu", do_classifier_free_guidance=False)
    cache = TrainingCache(torch.cat(means), torch.cat(stds), torch.cat(embeds), torch.cat(pooled), empty, empty_pooled,
                          float(pipe.vae.config.scaling_factor), captions, torch.from_numpy(arrays["boxes"]),
                          torch.from_numpy(arrays["keypoints"]))  # fmt: skip
    scaled_std = float(cache.latent_mean.std() * cache.scaling_factor)
    megabytes = sum(t.numel() * t.element_size() for t in (cache.latent_mean, cache.latent_std, cache.prompt_embeds))
    logger.info("cached %d images (%.0f MB); scaled latent std %.2f (SDXL aims at ~1)", len(cache), megabytes / 2**20,
                scaled_std)  # fmt: skip
    return cache


def sample_batch(cache: TrainingCache, config: UNetTrainConfig, generator: torch.Generator) -> dict:
    """A random batch of UNet inputs: scaled latents, text states (some dropped to ""), SDXL time ids, and the
    cache rows drawn (`index`, for inputs a trainer derives from the cached ground truth)."""
    index = torch.randint(len(cache), (config.batch_size,), generator=generator)
    noise = torch.randn(cache.latent_mean[index].shape, generator=generator)
    latents = (cache.latent_mean[index] + cache.latent_std[index] * noise) * cache.scaling_factor
    drop = torch.rand(config.batch_size, generator=generator) < config.caption_dropout
    embeds = torch.where(drop[:, None, None], cache.empty_embeds, cache.prompt_embeds[index].float())
    pooled = torch.where(drop[:, None], cache.empty_pooled, cache.pooled[index].float())
    size = config.image_size
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32).repeat(config.batch_size, 1)
    return {"latents": latents, "encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": time_ids,
            "index": index}  # fmt: skip


@dataclass
class TrainState:
    """What a UNet training step uses and updates besides the weights."""

    accelerator: Accelerator
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    noise_scheduler: DDPMScheduler
    generator: torch.Generator  # batches, noise, timesteps, caption dropout


def training_state(unet: UNet2DConditionModel, config: UNetTrainConfig, accelerator: Accelerator):
    """AdamW with warmup + cosine decay, EMA and the noise schedule for `unet`; returns (prepared unet, state)."""
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=config.steps)
    unet, optimizer, schedule = accelerator.prepare(unet, optimizer, schedule)
    ema = EMAModel(unet.parameters(), decay=config.ema_decay) if config.ema_decay > 0 else None
    noise_scheduler = DDPMScheduler(**NOISE_SCHEDULE, prediction_type=config.prediction_type)
    generator = torch.Generator().manual_seed(config.seed)
    accelerator.register_for_checkpointing(GeneratorState(generator))
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    return unet, TrainState(accelerator, optimizer, schedule, ema, noise_scheduler, generator)


_LAYER = re.compile(r"\.transformer_blocks\.(\d+)\.")
_OUTPUT_PROJECTIONS = ("attn1.to_out.0.", "attn2.to_out.0.", "ff.net.2.")  # what each transformer layer adds


def load_init(unet: UNet2DConditionModel, folder: str | Path) -> list[str]:
    """Copy a trained UNet's weights into `unet`; a different architecture raises, naming what differs.

    One difference is allowed, growth: more transformer layers per block than the trained UNet has
    (`transformer_layers_per_block`). Each added layer starts as the identity, its attention and feed-forward
    output projections zeroed (as ControlNet's zero convolutions), so the grown UNet computes exactly what the
    trained one did and training goes on from there. Returns the added tensors' names."""
    trained = UNet2DConditionModel.from_pretrained(folder)
    ours, theirs = unet.state_dict(), trained.state_dict()
    first_layer = {k: _LAYER.sub(".transformer_blocks.0.", k) for k in ours if _LAYER.search(k)}
    added = [k for k, first in first_layer.items() if k not in theirs and first in theirs]
    differ = sorted((set(ours) - set(added)) ^ set(theirs))
    differ += [k for k in ours if k in theirs and ours[k].shape != theirs[k].shape]
    if differ:
        raise ValueError(f"{folder}: its UNet differs from this config's in {len(differ)} tensors, e.g. {differ[:3]}")
    unet.load_state_dict(theirs, strict=False)
    with torch.no_grad():
        for name in added:
            if any(part in name for part in _OUTPUT_PROJECTIONS):
                ours[name].zero_()  # state_dict tensors share the parameters' storage
    if added:
        logger.info("grown from %s: %d tensors in added transformer layers, as the identity", folder, len(added))
    return added


def train_step(unet, cache: TrainingCache, state: TrainState, config: UNetTrainConfig) -> torch.Tensor:
    """One optimiser step of `train_unet` (also what eval/bench_unet.py times): a batch, the diffusion loss,
    backward, gradient clipping, AdamW, the learning-rate schedule and EMA. Returns the loss."""
    accelerator = state.accelerator
    batch = {k: v.to(accelerator.device) for k, v in sample_batch(cache, config, state.generator).items()}
    with accelerator.accumulate(unet):
        loss = diffusion_loss(unet, state.noise_scheduler, batch, state.generator, config.snr_gamma)
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(unet.parameters(), config.grad_clip)
        state.optimizer.step()
        state.schedule.step()
        state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.step(unet.parameters())
    return loss


def train_unet(config: UNetTrainConfig, out_dir: str | Path, clip_path=None, vae_path=None, *,
               progress: bool = True, resume: bool = False) -> Path:  # fmt: skip
    """Train the toy UNet against the frozen toy CLIP and VAE (random stand-ins where None); returns out_dir.

    out_dir gets the diffusers UNet (config.json + safetensors), model_card.json + README.md and losses.json,
    and while training `checkpoints/step-N`; `resume=True` continues from the newest bit for bit.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    set_seed(config.seed)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    with tempfile.TemporaryDirectory() as tokenizer_dir:  # used only if the CLIP folder has no tokenizer files
        frozen = make_pipeline(None, text_components(clip_path, tokenizer_dir), toy_vae(vae_path))
    cache = build_cache(config, frozen, progress=progress)
    unet = build_toy_unet(config, cross_attention_dim=cache.prompt_embeds.shape[-1], pooled_dim=cache.pooled.shape[-1],
                          latent_channels=cache.latent_mean.shape[1])  # fmt: skip
    n_params = sum(p.numel() for p in unet.parameters())
    logger.info("UNet: %.2f M parameters, %d images, %d steps at batch %d", n_params / 1e6, len(cache), config.steps,
                config.batch_size)  # fmt: skip
    if config.init_from:
        load_init(unet, config.init_from)
    unet, state = training_state(unet, config, accelerator)
    unet.train()
    curve, seconds, first = run_logged_steps(
        lambda: train_step(unet, cache, state, config), accelerator=accelerator, out=out_dir, total=config.steps,
        log_every=config.log_every, checkpoint_every=config.checkpoint_every, keep=config.keep_checkpoints,
        resume=resume, desc="training UNet", progress=progress, logger=logger)  # fmt: skip
    unet = accelerator.unwrap_model(unet)
    if state.ema is not None:
        state.ema.copy_to(unet.parameters())
    unet.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / LOSSES_FILE).write_text(json.dumps(curve) + "\n")
    figures = {"parameters": n_params, "attention_modules": len(find_targets(unet)), "images": len(cache),
               "steps_per_second": (config.steps - first + 1) / seconds, "first_loss": curve[0]["loss"],
               "final_loss": curve[-1]["loss"]}  # fmt: skip
    sources = {"clip": str(clip_path or "random stand-in"), "vae": str(vae_path or "random stand-in")}
    write_model_card(out_dir, name="toy SDXL UNet", config=config, train_seconds=curve_seconds(curve),
                     figures=figures,
                     summary="An SDXL-architecture UNet2DConditionModel trained on toy portraits and their captions "
                     f"({config.prediction_type} prediction, scaled_linear schedule, 10 % caption dropout). "
                     "Loss curve: losses.json.",
                     extra={"sources": sources})  # fmt: skip
    logger.info("UNet written to %s (%.0f s this session)", out_dir, seconds)
    return out_dir


def load_unet_train_config(folder: str | Path) -> UNetTrainConfig:
    """The UNetTrainConfig a UNet folder was trained with, from its model card (unknown keys raise)."""
    return UNetTrainConfig.from_dict(read_model_card(folder)["config"])
