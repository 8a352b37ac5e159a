"""The toy ControlNet (Zhang et al. 2023): a trainable copy of the toy UNet's encoder, steered by a face pose map.

The condition is a pose map drawn from five keypoints (eyes, nose tip, mouth corners) and a face box: each keypoint
a coloured gaussian dot, the box a grey outline (`pose_map`). The toy renders know both exactly, so training draws
the maps from the ground truth; at inference any detected face gives one (`pose_map(face.kps, face.bbox, size)`).

`ControlNetModel.from_unet` copies the frozen UNet's encoder and adds zero-initialised convolutions, so the
ControlNet starts as the identity; only the ControlNet trains, on the toy UNet trainer's cache (VAE latents and
text states of a fixed rendered set, `build_cache`), with the shared diffusion loss whose `unet_inputs` hook adds
the ControlNet's residuals to the frozen UNet. The result loads with plain diffusers and drives
`StableDiffusionXLControlNetPipeline` (`hyperlora.pipeline.with_controlnet`), a HyperLoRA LoRA fused or not.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import ControlNetModel, UNet2DConditionModel

from ..config import strict_from_dict
from ..diffusion import diffusion_loss
from ..train.resume import curve_seconds, run_logged_steps
from .cards import read_model_card, write_model_card
from .pipeline import DEFAULT_PIPELINE_DIR, REPO_ROOT, load_toy_pipeline, trained_prediction_type
from .unet import LOSSES_FILE, TrainingCache, build_cache, sample_batch, training_state

logger = logging.getLogger(__name__)

DEFAULT_UNET_DIR = DEFAULT_PIPELINE_DIR / "unet"  # the shipped toy UNet; a candidate UNet folder replaces it
# RGB of each keypoint's dot, in insightface's order. Left and right differ, so a mirrored pose is another map.
KEYPOINT_COLOURS = (
    (1.0, 0.0, 0.0),  # left eye: red
    (0.0, 1.0, 0.0),  # right eye: green
    (0.0, 0.0, 1.0),  # nose tip: blue
    (1.0, 1.0, 0.0),  # left mouth corner: yellow
    (1.0, 0.0, 1.0),  # right mouth corner: magenta
)
DOT_SIGMA = 1.5 / 64  # a dot's gaussian std as a fraction of the map's shorter side: 1.5 px at 64 px, where the
# eyes are 10-12 px apart
BOX_LEVEL = 0.5  # grey level of the face box's outline (the dots, at full colour, stay distinct from it)
CONDITION = "pose map: 5 keypoints as coloured gaussian dots (hyperlora.toy.controlnet.pose_map) + face box outline"


def pose_maps(keypoints, boxes=None, size: int | tuple[int, int] = 64) -> torch.Tensor:
    """Pose maps float [N, 3, H, W] in [0, 1] (the ControlNet pipeline's range) from keypoints [N, 5, 2] and face
    boxes [N, 4] (x1, y1, x2, y2; None: no outline), both in pixels of the map (pixel centres at integers)."""
    points = _checked(keypoints, (5, 2), "keypoints")
    height, width = (size, size) if isinstance(size, int) else size
    if height < 1 or width < 1:
        raise ValueError(f"pose map size must be positive, got {size}")
    sigma = DOT_SIGMA * min(height, width)
    ys = torch.arange(height, dtype=torch.float32).view(1, 1, height, 1)
    xs = torch.arange(width, dtype=torch.float32).view(1, 1, 1, width)
    x, y = points[..., 0, None, None], points[..., 1, None, None]  # [N, 5, 1, 1]
    dots = torch.exp(-((xs - x) ** 2 + (ys - y) ** 2) / (2 * sigma**2))  # [N, 5, H, W]
    colours = torch.tensor(KEYPOINT_COLOURS).view(1, 5, 3, 1, 1)
    image = (dots[:, :, None] * colours).amax(1)  # [N, 3, H, W]: each dot in its own colour
    if boxes is not None:
        x1, y1, x2, y2 = (v.view(-1, 1, 1) for v in _checked(boxes, (4,), "boxes").unbind(-1))
        if len(x1) != len(points):
            raise ValueError(f"{len(points)} keypoint sets but {len(x1)} boxes")
        xs, ys = xs[0], ys[0]  # [1, 1, W], [1, H, 1]
        outside = torch.hypot((x1 - xs).clamp(min=0) + (xs - x2).clamp(min=0),
                              (y1 - ys).clamp(min=0) + (ys - y2).clamp(min=0))  # fmt: skip
        inside = torch.minimum(torch.minimum(xs - x1, x2 - xs), torch.minimum(ys - y1, y2 - ys)).clamp(min=0)
        distance = torch.where(outside > 0, outside, inside)  # [N, H, W] to the box's outline
        outline = BOX_LEVEL * torch.exp(-(distance**2) / (2 * (sigma / 2) ** 2))
        image = torch.maximum(image, outline[:, None])
    return image


def pose_map(keypoints, box=None, size: int | tuple[int, int] = 64) -> np.ndarray:
    """One pose map as uint8 RGB [H, W, 3] (PIL.Image.fromarray gives the pipeline's `image`), from keypoints [5, 2]
    and a face box [4] in pixels of the map: a render's ground truth, or a detected face's `kps` and `bbox`."""
    points = np.asarray(keypoints, dtype=np.float32)
    if points.shape != (5, 2):
        raise ValueError(f"keypoints must be [5, 2] (eyes, nose tip, mouth corners; x, y), got {list(points.shape)}")
    boxes = None if box is None else np.asarray(box, dtype=np.float32)[None]
    image = pose_maps(points[None], boxes, size)[0]
    return image.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def _checked(values, shape: tuple[int, ...], what: str) -> torch.Tensor:
    """float32 [N, *shape] from an array or tensor; a wrong shape or a non-finite value raises, naming it."""
    tensor = torch.as_tensor(np.asarray(values, dtype=np.float32) if not torch.is_tensor(values) else values).float()
    if tensor.ndim != len(shape) + 1 or tuple(tensor.shape[1:]) != shape:
        raise ValueError(f"{what} must be [N, {', '.join(map(str, shape))}], got {list(tensor.shape)}")
    if not torch.isfinite(tensor).all():
        raise ValueError(f"{what} must be finite")
    return tensor


@dataclass
class ControlNetTrainConfig:
    """Architecture, data and optimisation of the toy ControlNet; saved in its model card."""

    # Architecture: everything but the condition encoder is copied from the UNet (ControlNetModel.from_unet).
    conditioning_channels: tuple[int, ...] = (16, 32, 64)  # condition encoder widths; len - 1 stride-2 convs must
    # bring the image to the latent size: 3 for the toy VAE's f = 4 (SDXL's f = 8: diffusers' (16, 32, 96, 256))
    # Data: the toy UNet trainer's rendered set and cache (build_cache reads these fields).
    num_identities: int = 2000  # training identities (ids 0..n-1 of split_identities("train"))
    images_per_identity: int = 4  # looks (poses, framings) per identity
    data_seed: int = 0  # ToyPortraits seed of the rendered set
    image_size: int = 64  # render and pose map size; latents are image_size / 4
    nonsense_prefix_prob: float = 0.3  # captions with 1-3 rare words in front, as HyperLoRA's trigger words
    caption_dropout: float = 0.5  # share of captions replaced by "": ControlNet's 50 % (Zhang et al. 2023, 3.2),
    # so the pose is learned from the map rather than read off the caption
    # Optimisation (only the ControlNet trains; the UNet is frozen).
    steps: int = 6000  # optimiser steps: 12 passes over the 8,000 renders. A step costs about what a toy UNet step
    # does (1.03x its CPU time at batch 16), ~0.29 s on one idle thread: ~30 min in all
    batch_size: int = 16
    lr: float = 1e-4  # AdamW peak rate: the copied encoder starts trained, so below the UNet's 6e-4
    warmup_steps: int = 100  # linear warmup, then cosine decay to 0
    weight_decay: float = 1e-2
    grad_clip: float = 1.0  # max gradient norm
    snr_gamma: float | None = None  # None: the plain loss on the UNet's target. Min-SNR (5.0) would down-weight
    # the high-noise steps, where the layout, and so the pose, is decided
    prediction_type: str = ""  # "": the UNet's own (its model card), written here when training starts
    ema_decay: float = 0.999  # EMA of the saved weights; 0 turns EMA off
    save_dtype: str = "float16"  # dtype of the saved weights (the shipped folder's size); they load as float32
    # Runtime.
    threads: int = 1  # torch CPU threads
    seed: int = 0  # global seed: init, batches, noise, caption dropout
    log_every: int = 50  # steps per loss-curve point and log line
    mixed_precision: str = "no"  # accelerate's setting: "no", "fp16", "bf16"
    checkpoint_every: int = 500  # steps between resumable checkpoints in <out>/checkpoints (0: none)
    keep_checkpoints: int = 2  # newest checkpoints kept

    @classmethod
    def smoke(cls, **overrides) -> ControlNetTrainConfig:
        """Seconds, not minutes: a tiny set and a few steps, to check the plumbing end to end."""
        values = {"num_identities": 8, "images_per_identity": 2, "steps": 3, "batch_size": 4, "warmup_steps": 1,
                  "ema_decay": 0.0, "log_every": 1, "checkpoint_every": 0}  # fmt: skip
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> ControlNetTrainConfig:
        return strict_from_dict(cls, values)


# What a ControlNet copies from its UNet: a ControlNet drives only a UNet that agrees on all of them.
MATCHING_KEYS = ("in_channels", "block_out_channels", "down_block_types", "layers_per_block",
                 "transformer_layers_per_block", "attention_head_dim", "cross_attention_dim", "addition_embed_type",
                 "addition_time_embed_dim", "projection_class_embeddings_input_dim")  # fmt: skip


def check_matches(controlnet: ControlNetModel, unet: UNet2DConditionModel) -> None:
    """Raise ValueError naming every setting in which `controlnet` was built for another UNet than `unet`."""
    same = lambda a, b: json.dumps(a) == json.dumps(b)  # tuples and lists compare by value
    differ = [f"{key}: ControlNet {controlnet.config.get(key)} vs UNet {unet.config.get(key)}" for key in MATCHING_KEYS
              if not same(controlnet.config.get(key), unet.config.get(key))]  # fmt: skip
    if differ:
        raise ValueError("this ControlNet was built for another UNet: " + "; ".join(differ))


def load_frozen_unet(unet_dir: str | Path) -> UNet2DConditionModel:
    """The UNet the ControlNet steers, float32, without gradients; a folder without a UNet raises, naming it."""
    unet_dir = Path(unet_dir)
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"--unet {unet_dir}: no diffusers UNet there (config.json + *.safetensors); the "
                                f"default is the shipped {DEFAULT_UNET_DIR}")  # fmt: skip
    return UNet2DConditionModel.from_pretrained(unet_dir, dtype=torch.float32).eval().requires_grad_(False)


def controlnet_residuals(controlnet: ControlNetModel, noisy, timesteps, batch: dict) -> dict:
    """The ControlNet's residuals for the UNet (diffusion_loss's `unet_inputs`), from the batch's `controlnet_cond`."""
    added = {"text_embeds": batch["text_embeds"], "time_ids": batch["time_ids"]}
    down, mid = controlnet(noisy, timesteps, batch["encoder_hidden_states"], controlnet_cond=batch["controlnet_cond"],
                           added_cond_kwargs=added, return_dict=False)  # fmt: skip
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def train_step(controlnet, unet, cache: TrainingCache, state, config: ControlNetTrainConfig) -> torch.Tensor:
    """One optimiser step: a cached batch with its pose maps, the diffusion loss through the frozen UNet plus the
    ControlNet's residuals, backward, clipping, AdamW, the schedule and EMA. Returns the loss."""
    accelerator = state.accelerator
    batch = sample_batch(cache, config, state.generator)
    index = batch.pop("index")
    batch["controlnet_cond"] = pose_maps(cache.keypoints[index], cache.boxes[index], config.image_size)
    batch = {k: v.to(accelerator.device) for k, v in batch.items()}
    with accelerator.accumulate(controlnet), accelerator.autocast():
        residuals = lambda noisy, t, b: controlnet_residuals(controlnet, noisy, t, b)
        loss = diffusion_loss(unet, state.noise_scheduler, batch, state.generator, config.snr_gamma,
                              unet_inputs=residuals)  # fmt: skip
        accelerator.backward(loss)
        accelerator.clip_grad_norm_(controlnet.parameters(), config.grad_clip)
        state.optimizer.step()
        state.schedule.step()
        state.optimizer.zero_grad(set_to_none=True)
    if state.ema is not None:
        state.ema.step(controlnet.parameters())
    return loss


def _prepare(config: ControlNetTrainConfig, unet_dir: Path, pipe) -> ControlNetTrainConfig:
    """`config` with the UNet's prediction type filled in; settings that cannot fit this UNet and VAE raise here,
    before anything is rendered."""
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    if 2 ** (len(config.conditioning_channels) - 1) != factor:
        raise ValueError(f"conditioning_channels {config.conditioning_channels} downsample "
                         f"{2 ** (len(config.conditioning_channels) - 1)}x, but the VAE's latents are {factor}x smaller "
                         f"than the image: give {int(np.log2(factor)) + 1} widths")  # fmt: skip
    if config.save_dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"save_dtype must be float32, float16 or bfloat16, got {config.save_dtype!r}")
    unet_kind = trained_prediction_type(unet_dir)
    if config.prediction_type and config.prediction_type != unet_kind:
        raise ValueError(f"prediction_type {config.prediction_type!r}, but the UNet at {unet_dir} predicts "
                         f"{unet_kind!r}")  # fmt: skip
    return dataclasses.replace(config, prediction_type=unet_kind)


def train_controlnet(config: ControlNetTrainConfig, out_dir: str | Path, unet_dir: str | Path = DEFAULT_UNET_DIR,
                     pipeline_dir: str | Path = DEFAULT_PIPELINE_DIR, *, progress: bool = True,
                     resume: bool = False) -> Path:  # fmt: skip
    """Train a ControlNet for the frozen UNet in `unet_dir` (text encoders and VAE: the toy pipeline's); returns out_dir.

    out_dir gets the diffusers ControlNetModel (config.json + safetensors), model_card.json + README.md and
    losses.json, and while training `checkpoints/step-N`; `resume=True` continues from the newest bit for bit.
    """
    out_dir, unet_dir = Path(out_dir), Path(unet_dir)
    unet = load_frozen_unet(unet_dir)  # a wrong --unet fails before anything slow
    torch.set_num_threads(config.threads)
    set_seed(config.seed)
    accelerator = Accelerator(mixed_precision=config.mixed_precision)
    frozen = load_toy_pipeline(pipeline_dir, unet=unet)  # text encoders and VAE as sampling uses them
    config = _prepare(config, unet_dir, frozen)
    cache = build_cache(config, frozen, progress=progress)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=config.conditioning_channels)
    if unet.config.cross_attention_dim != cache.prompt_embeds.shape[-1]:
        raise ValueError(f"the UNet at {unet_dir} reads {unet.config.cross_attention_dim}-wide text states, the "
                         f"pipeline at {pipeline_dir} gives {cache.prompt_embeds.shape[-1]}")  # fmt: skip
    n_params = sum(p.numel() for p in controlnet.parameters())
    logger.info("ControlNet: %.2f M parameters, %d images, %d steps at batch %d", n_params / 1e6, len(cache),
                config.steps, config.batch_size)  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    controlnet, state = training_state(controlnet, config, accelerator)
    unet.to(accelerator.device)
    controlnet.train()
    curve, seconds, first = run_logged_steps(
        lambda: train_step(controlnet, unet, cache, state, config), accelerator=accelerator, out=out_dir,
        total=config.steps, log_every=config.log_every, checkpoint_every=config.checkpoint_every,
        keep=config.keep_checkpoints, resume=resume, desc="training ControlNet", progress=progress,
        logger=logger)  # fmt: skip
    controlnet = accelerator.unwrap_model(controlnet)
    if state.ema is not None:
        state.ema.copy_to(controlnet.parameters())
    controlnet.to(getattr(torch, config.save_dtype)).save_pretrained(out_dir, safe_serialization=True)
    (out_dir / LOSSES_FILE).write_text(json.dumps(curve) + "\n")
    _write_card(out_dir, config, unet_dir, pipeline_dir, curve_seconds(curve),
                {"parameters": n_params, "images": len(cache), "steps_per_second": (config.steps - first + 1) / seconds,
                 "first_loss": curve[0]["loss"], "final_loss": curve[-1]["loss"]})  # fmt: skip
    logger.info("ControlNet written to %s (%.0f s)", out_dir, seconds)
    return out_dir


def _write_card(out_dir: Path, config, unet_dir: Path, pipeline_dir, seconds: float, figures: dict) -> None:
    weights = sorted(unet_dir.glob("*.safetensors"))
    sha = hashlib.sha256(weights[0].read_bytes()).hexdigest() if weights else None
    sources = {"unet": _shown(unet_dir), "unet_weights_sha256": sha, "pipeline": _shown(pipeline_dir)}
    write_model_card(out_dir, name="toy SDXL ControlNet (face pose)", config=config, train_seconds=seconds,
                     figures=figures, extra={"sources": sources, "condition": CONDITION},
                     summary="A diffusers ControlNetModel made from the toy UNet (ControlNetModel.from_unet) and "
                     "trained on toy renders with their ground-truth pose maps: five keypoints as coloured dots and the "
                     "face box's outline (hyperlora.toy.controlnet.pose_map). Use it with "
                     "StableDiffusionXLControlNetPipeline on the UNet named in `sources`; measure it with "
                     "`python -m eval.controlnet`. Loss curve: losses.json.")  # fmt: skip


def _shown(path) -> str:
    """`path` relative to the repository when inside it (a shipped card names no machine's folders), else as given."""
    try:
        return str(Path(path).resolve().relative_to(REPO_ROOT))
    except ValueError:
        return str(path)


def load_controlnet_train_config(folder: str | Path) -> ControlNetTrainConfig:
    """The ControlNetTrainConfig a ControlNet folder was trained with, from its model card (unknown keys raise)."""
    return ControlNetTrainConfig.from_dict(read_model_card(folder)["config"])
