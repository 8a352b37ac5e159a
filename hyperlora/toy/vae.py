"""The toy VAE: a diffusers `AutoencoderKL` with f = 4 (64 x 64 renders <-> 8 x 16 x 16 latents).

Trained from scratch on toy renders with an L1 + L2 reconstruction loss (face pixels, from the
renders' masks, weighted `face_weight` times more), an L1 loss on image
gradients (it rewards sharp edges), a small KL term and an identity-perceptual loss: no pretrained
network (LPIPS's VGG/AlexNet) is available offline, so a small CNN is first trained on face crops of
the same renders to read every identity trait (`identity_network`), and the VAE matches its features
on the same crops of original and reconstruction (`face_crops`, `identity_distance`: LPIPS without
learned weights). As in Stable Diffusion, `scaling_factor` in
its config is 1 / std of the latents measured on training renders, so that scaled latents have
unit variance for the toy UNet.

Gates (`evaluate_vae`): reconstruction PSNR >= 28 dB on held-out ('test') renders, and identity
kept through the VAE: mean toy-ArcFace cosine >= 0.9 between originals and reconstructions. The
identity figure needs a face embedder: pass it as `face_embed` (the build passes the toy faces').
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from diffusers import AutoencoderKL
from torchvision.ops import roi_align
from tqdm.auto import tqdm
from transformers import get_cosine_schedule_with_warmup

from ..config import strict_from_dict
from .cards import write_model_card
from .data import ToyPortraits, render_arrays, split_renders, to_tensor, to_uint8
from .render import split_identities
from .teacher import AttributeCNN, evaluate_attribute_cnn, fit_attribute_cnn, identity_trait_labels

log = logging.getLogger(__name__)

PSNR_GATE = 28.0  # dB, reconstruction of held-out renders
IDENTITY_GATE = 0.9  # mean toy-ArcFace cosine between a held-out render and its reconstruction
EVAL_SEED = 20251  # data seed of the evaluation renders: identical images run to run

# A face embedder: uint8 images [N, H, W, 3] -> embeddings [N, D] (numpy or torch); e.g. the toy ArcFace.
FaceEmbed = Callable[[np.ndarray], "np.ndarray | torch.Tensor"]


@dataclass
class VAETrainConfig:
    """Architecture, data and optimisation of the toy VAE; saved in its model card."""

    # architecture
    image_size: int = 64  # renders are 64 x 64
    block_out_channels: tuple[int, ...] = (32, 64, 64)  # 3 levels -> 2 downsamplings -> f = 4
    layers_per_block: int = 1  # resnets per level (the decoder has one more)
    latent_channels: int = 8  # SD/SDXL use 4; at 64 px, 4 x 16 x 16 latents lost the face details that make
    # identity (26.6 dB, identity cosine 0.69 after 50 min), so the toy VAE keeps 8 (the toy UNet follows it)
    norm_num_groups: int = 16  # GroupNorm groups; must divide every block width
    # data
    num_train: int = 2000  # training identities 0..num_train-1 (never a held-out one)
    images_per_identity: int = 4  # renders per identity, pre-rendered into memory once
    data_seed: int = 0  # seed of the training renders
    # optimisation
    steps: int = 3500  # AdamW steps (~35 min on one thread beside another job); 2,600 gave 27.7 dB
    batch_size: int = 16  # small batches, more steps for the time
    lr: float = 1e-3  # peak learning rate after warmup, cosine decay to 0
    weight_decay: float = 0.0
    warmup_steps: int = 100
    grad_clip: float = 1.0  # max gradient norm
    l1_weight: float = 1.0  # mean |x - x_hat| on [-1, 1] pixels
    l2_weight: float = 1.0  # mean (x - x_hat)^2: what PSNR measures
    edge_weight: float = 0.5  # L1 between horizontal and vertical image gradients: sharp edges
    kl_weight: float = 1e-6  # on the KL per latent element (mean); small, as in SD's VAE
    face_weight: float = 6.0  # extra weight of face pixels (render mask) in the L1/L2 terms: the face is ~8 %
    # of the image but carries the identity that HyperLoRA must reproduce. At 3,500 steps, 6 gave 28.6 dB and
    # identity cosine 0.867; 12 gave 28.3 dB and 0.865 (2,600 steps at 4: 27.7 dB, 0.82)
    identity_weight: float = 1.0  # weight of an identity-perceptual loss: LPIPS-style distance (unit-normalised
    # channels, squared difference, averaged over blocks) between the features of original and reconstruction in
    # a small CNN trained first to read every identity trait of the training renders (`identity_network`; no
    # pretrained network is available offline). It is not the toy ArcFace that judges the identity gate. 0: none
    identity_steps: int = 2000  # the identity CNN's AdamW steps (batch 64). On face crops, selected on 'val'
    # renders: 1,000 steps read traits at 0.458 (VAE identity cosine 0.924), 2,000 at 0.464 (0.934), 4.3 min
    identity_widths: tuple[int, ...] = (32, 64, 96, 128)  # its conv blocks
    identity_crop: int = 32  # the identity CNN reads a square crop around the render's face box, resampled to
    # this side (`face_crops`): the face is ~28 x 31 px of the 64 x 64 render, so a 32 px crop keeps its detail
    # at a quarter of the whole image's cost. 0: the whole image (the build then took 55 min for the VAE alone)
    identity_margin: float = 1.2  # the crop's side over the face box's longer side (keeps jaw and forehead)
    seed: int = 0  # model initialisation, batch order and posterior samples
    threads: int = 1  # torch CPU threads; on the shared 2-core box 2 threads ran ~9x slower than 1
    # calibration, evaluation and saving
    scale_images: int = 512  # training renders whose latents set scaling_factor = 1 / std
    eval_identities: int | None = None  # 'test' identities evaluated for the gate (None: all 200)
    eval_per_identity: int = 2  # renders per 'test' identity for the gate
    save_dtype: str = "float32"  # ~1 M parameters: 4 MB in float32, so no need to halve
    log_every: int = 50  # steps between log lines

    def __post_init__(self):
        self.block_out_channels = tuple(self.block_out_channels)
        self.identity_widths = tuple(self.identity_widths)
        if any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"norm_num_groups {self.norm_num_groups} must divide every block width "
                             f"{self.block_out_channels}")

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def smoke(cls, **overrides) -> "VAETrainConfig":
        """Tiny sizes and a handful of steps: checks the plumbing in seconds, learns nothing."""
        values = dict(block_out_channels=(8, 16, 16), norm_num_groups=8, num_train=8, images_per_identity=2, steps=3,
                      batch_size=8, warmup_steps=1, scale_images=16, eval_identities=8, eval_per_identity=1,
                      log_every=1, identity_steps=2, identity_widths=(4, 8, 8))  # fmt: skip
        return cls(**{**values, **overrides})

    @classmethod
    def from_dict(cls, values: dict) -> "VAETrainConfig":
        """The config of a model card (`read_model_card(folder)["config"]`); unknown keys raise."""
        return strict_from_dict(cls, values)


def build_vae(config: VAETrainConfig) -> AutoencoderKL:
    """A randomly initialised AutoencoderKL of the configured size (seeded by `config.seed`)."""
    torch.manual_seed(config.seed)
    levels = len(config.block_out_channels)
    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels, block_out_channels=config.block_out_channels,
        layers_per_block=config.layers_per_block, latent_channels=config.latent_channels,
        norm_num_groups=config.norm_num_groups, sample_size=config.image_size, scaling_factor=1.0,
    )  # fmt: skip


def _edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return x[..., :, 1:] - x[..., :, :-1], x[..., 1:, :] - x[..., :-1, :]


def face_crops(images: torch.Tensor, boxes: torch.Tensor, size: int, margin: float = 1.2) -> torch.Tensor:
    """Square crops [N, C, size, size] of images [N, C, H, W] around face boxes [N, 4] (x0, y0, x1, y1 in
    pixels), `margin` times the box's longer side, bilinearly resampled (torchvision's `roi_align`, which
    passes gradients to `images`). size 0: the images unchanged."""
    if not size:
        return images
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    half = (boxes[:, 2:] - boxes[:, :2]).amax(1, keepdim=True) * margin / 2
    rois = torch.cat([torch.arange(len(boxes), dtype=boxes.dtype)[:, None], centre - half, centre + half], 1)
    return roi_align(images, rois.to(images), size, sampling_ratio=2, aligned=True)


def identity_network(config: VAETrainConfig, images: torch.Tensor, boxes: torch.Tensor, identities: np.ndarray
                     ) -> tuple[AttributeCNN, dict]:  # fmt: skip
    """The identity-perceptual loss's network: an `AttributeCNN` trained on face crops (`face_crops`) of the
    VAE's training renders to read every identity trait (`identity_trait_labels`: skin tone, iris colour, marks,
    binned face, eye, brow, nose and mouth geometry), frozen, in eval mode; and its mean trait accuracy on renders
    of 'val' people."""
    start = time.time()
    labels, classes, edges = identity_trait_labels(identities)
    crops = face_crops(images, boxes, config.identity_crop, config.identity_margin)
    net = fit_attribute_cnn(crops, labels, widths=config.identity_widths, steps=config.identity_steps,
                            seed=config.seed, classes=classes, desc="identity-trait CNN")  # fmt: skip
    val = split_renders("val", 100, 2, EVAL_SEED, config.image_size)
    truth = identity_trait_labels(val["identities"], edges=edges)[0]
    val_crops = face_crops(to_tensor(val["images"]), torch.from_numpy(val["boxes"]), config.identity_crop,
                           config.identity_margin)  # fmt: skip
    result = evaluate_attribute_cnn(net, val_crops, truth, classes)
    figures = {"identity_net_val_trait_accuracy": result["mean"], "identity_net_val_per_trait": result["accuracy"],
               "identity_net_seconds": time.time() - start}
    log.info("identity-trait CNN: val trait accuracy %.3f (%.0f s)", figures["identity_net_val_trait_accuracy"],
             figures["identity_net_seconds"])  # fmt: skip
    return net.requires_grad_(False), figures


def identity_distance(net: AttributeCNN, recon: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """LPIPS-style distance without learned weights (Zhang et al. 2018): per block of `net`, channels
    unit-normalised at every position, squared difference summed over channels, averaged over positions and
    images; the mean over blocks. Gradients flow into `recon` only."""
    with torch.no_grad():
        targets = net.features(images)
    distances = [(F.normalize(a, dim=1) - F.normalize(b, dim=1)).pow(2).sum(1).mean()
                 for a, b in zip(net.features(recon), targets)]  # fmt: skip
    return torch.stack(distances).mean()


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, config: VAETrainConfig, generator=None,
             masks: torch.Tensor | None = None, identity_net: AttributeCNN | None = None,
             boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Weighted L1 + L2 + image-gradient L1 reconstruction loss plus KL; images in [-1, 1]. With face
    `masks` [N, H, W] the L1/L2 terms weigh face pixels 1 + config.face_weight times (mean weight kept at 1);
    with `identity_net`, plus config.identity_weight x `identity_distance` on the face crops around `boxes`
    [N, 4] (config.identity_crop 0: on the whole images, and `boxes` may be None)."""
    posterior = vae.encode(images).latent_dist
    recon = vae.decode(posterior.sample(generator)).sample
    weight = torch.ones_like(images[:, :1])
    if masks is not None and config.face_weight:
        weight = 1.0 + config.face_weight * masks[:, None].to(images.dtype)
        weight = weight / weight.mean()
    terms = {
        "l1": ((recon - images).abs() * weight).mean(),
        "l2": ((recon - images).pow(2) * weight).mean(),
        "edge": sum((a - b).abs().mean() for a, b in zip(_edges(recon), _edges(images))) / 2,
        "kl": posterior.kl().mean() / posterior.mean[0].numel(),
    }
    weights = {"l1": config.l1_weight, "l2": config.l2_weight, "edge": config.edge_weight, "kl": config.kl_weight}
    if identity_net is not None:
        if config.identity_crop and boxes is None:
            raise ValueError("the identity term reads face crops (config.identity_crop): pass the face boxes")
        recon_face, face = (face_crops(x, boxes, config.identity_crop, config.identity_margin) for x in (recon, images))
        terms["identity"] = identity_distance(identity_net, recon_face, face)
        weights["identity"] = config.identity_weight
    return sum(weights[k] * v for k, v in terms.items()), {k: v.item() for k, v in terms.items()}


@torch.no_grad()
def latent_std(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> float:
    """Standard deviation of posterior samples over `images` (SD sets scaling_factor = 1 / this)."""
    g = torch.Generator(device=images.device).manual_seed(0)
    samples = [vae.encode(images[i : i + batch]).latent_dist.sample(g) for i in range(0, len(images), batch)]
    return torch.cat(samples).float().std().item()


def save_vae(vae: AutoencoderKL, folder: str | Path, dtype: str = "float32") -> Path:
    """save_pretrained (safetensors) in `dtype`; scaling_factor is already in the config."""
    folder = Path(folder)
    if dtype == "float32":  # casting float32 to itself would only make diffusers warn
        vae.save_pretrained(folder, safe_serialization=True)
        return folder
    vae.to(getattr(torch, dtype)).save_pretrained(folder, safe_serialization=True)
    vae.to(torch.float32)
    return folder


def _training_images(config: VAETrainConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, np.ndarray]:
    """Training renders in [-1, 1] [N, 3, H, W], their face masks [N, H, W] (bool), face boxes [N, 4] and
    identities [N]."""
    data = ToyPortraits(split_identities("train", config.num_train), config.images_per_identity, config.data_seed,
                        size=config.image_size)  # fmt: skip
    arrays = render_arrays(data)
    images = to_tensor(arrays["images"])
    boxes, identities = torch.from_numpy(arrays["boxes"]), np.asarray(arrays["identities"])
    return images, torch.from_numpy(arrays["masks"]), boxes, identities


def train_vae(config: VAETrainConfig, out_dir: str | Path, *, evaluate: bool = True,
              face_embed: FaceEmbed | None = None) -> Path:
    """Train a toy VAE, calibrate scaling_factor, save it into `out_dir`, evaluate it and write its card."""
    torch.set_num_threads(config.threads)
    out_dir = Path(out_dir)
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), mixed_precision="no")
    images, masks, boxes, identities = _training_images(config)
    identity_net, figures = (identity_network(config, images, boxes, identities) if config.identity_weight
                             else (None, {}))  # fmt: skip
    dataset = torch.utils.data.TensorDataset(images, masks, boxes)
    loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size,
                                         shuffle=True, drop_last=True,
                                         generator=torch.Generator().manual_seed(config.seed))  # fmt: skip
    if len(loader) == 0:
        raise ValueError(f"batch_size {config.batch_size} exceeds the {len(images)} training renders")
    vae = build_vae(config)
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, config.warmup_steps, config.steps)
    vae, optimizer, loader, schedule = accelerator.prepare(vae, optimizer, loader, schedule)
    log.info("toy VAE: %.2f M parameters, %d training renders", sum(p.numel() for p in vae.parameters()) / 1e6,
             len(images))  # fmt: skip
    generator = torch.Generator(device=accelerator.device).manual_seed(config.seed)
    start, step, batches = time.time(), 0, iter(loader)
    vae.train()
    with tqdm(total=config.steps, desc="toy VAE", mininterval=2) as bar:
        while step < config.steps:
            try:
                batch, batch_masks, batch_boxes = next(batches)
            except StopIteration:
                batches = iter(loader)
                continue
            loss, terms = vae_loss(accelerator.unwrap_model(vae), batch, config, generator, batch_masks, identity_net,
                                   batch_boxes)  # fmt: skip
            accelerator.backward(loss)
            accelerator.clip_grad_norm_(vae.parameters(), config.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.steps:
                # face-weighted; [-1, 1] pixels: peak-to-peak 2
                train_psnr = 10 * np.log10(4.0 / max(terms["l2"], 1e-12))
                bar.set_postfix(loss=f"{loss.item():.4f}", psnr=f"{train_psnr:.1f}")
                log.info("step %d/%d loss %.4f train PSNR %.2f dB kl %.3f identity %.4f", step, config.steps,
                         loss.item(), train_psnr, terms["kl"], terms.get("identity", float("nan")))  # fmt: skip
    seconds = time.time() - start + figures.get("identity_net_seconds", 0.0)  # the identity CNN is part of training
    vae = accelerator.unwrap_model(vae).eval()
    std = latent_std(vae, images[: config.scale_images].to(accelerator.device))
    vae.register_to_config(scaling_factor=1.0 / std)
    save_vae(vae, out_dir, config.save_dtype)
    figures, gates = {"steps": step, "latent_std": std, **figures}, {}
    if evaluate:
        figures.update(evaluate_vae(out_dir, n_per_identity=config.eval_per_identity,
                                    num_identities=config.eval_identities, face_embed=face_embed,
                                    threads=config.threads))  # fmt: skip
        gates[f"psnr >= {PSNR_GATE}"] = figures["psnr"] >= PSNR_GATE
        if figures.get("identity_cosine") is not None:
            gates[f"identity_cosine >= {IDENTITY_GATE}"] = figures["identity_cosine"] >= IDENTITY_GATE
    write_model_card(out_dir, name="toy VAE", config=config, train_seconds=seconds, figures=figures, gates=gates,
                     summary=f"An AutoencoderKL with f = {config.downsample} trained from scratch on toy portraits: "
                     "the toy world's SDXL VAE.")  # fmt: skip
    return out_dir


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB of images in [-1, 1] (peak-to-peak 2), shape [N, C, H, W] -> [N]."""
    mse = (a.float() - b.float()).pow(2).mean(dim=(1, 2, 3)).clamp_min(1e-12)
    return 10 * torch.log10(4.0 / mse)


def _cosine(a, b) -> np.ndarray:
    a, b = (torch.as_tensor(np.asarray(x), dtype=torch.float32) for x in (a, b))
    return F.cosine_similarity(a, b, dim=-1).numpy()


@torch.no_grad()
def reconstruct(vae: AutoencoderKL, images: torch.Tensor, batch: int = 64) -> torch.Tensor:
    """Images [N, 3, H, W] in [-1, 1] through the encoder (posterior mode) and the decoder, clamped to [-1, 1]."""
    return torch.cat([vae.decode(vae.encode(images[i : i + batch]).latent_dist.mode()).sample.clamp(-1, 1)
                      for i in range(0, len(images), batch)])  # fmt: skip


@torch.no_grad()
def evaluate_vae(path: str | Path, *, split: str = "test", n_per_identity: int = 2, seed: int = EVAL_SEED,
                 num_identities: int | None = None, batch: int = 64, face_embed: FaceEmbed | None = None,
                 threads: int | None = None) -> dict:
    """Reconstruction PSNR (mean of per-image dB, and of the pooled MSE) on held-out renders, through
    the posterior mode, with the VAE loaded from `path`. With `face_embed` (uint8 [N, H, W, 3] ->
    [N, D]) also the cosine between embeddings of the originals and of their reconstructions."""
    if threads:
        torch.set_num_threads(threads)
    vae = AutoencoderKL.from_pretrained(path, dtype=torch.float32).eval()
    arrays = split_renders(split, num_identities, n_per_identity, seed, vae.config.sample_size)
    images = to_tensor(arrays["images"])
    recon = reconstruct(vae, images, batch)
    recon_uint8 = to_uint8(recon)  # what a saved image would hold
    per_image = psnr(images, to_tensor(recon_uint8))
    pooled_mse = (images - recon).pow(2).mean().item()
    figures = {
        "psnr": float(per_image.mean()),
        "psnr_min": float(per_image.min()),
        "psnr_pooled": float(10 * np.log10(4.0 / pooled_mse)),
        "l1": float((images - recon).abs().mean() / 2),  # on [0, 1] pixels
        "n_images": len(images),
        "split": split,
    }
    if face_embed is not None:  # NaN rows: the embedder found no face; counted, and left out of the means
        cosine = _cosine(face_embed(arrays["images"]), face_embed(recon_uint8))
        found = np.isfinite(cosine)
        figures["identity_pairs_measured"] = int(found.sum())
        figures["identity_cosine"] = float(cosine[found].mean()) if found.any() else None
        figures["identity_cosine_min"] = float(cosine[found].min()) if found.any() else None
    return figures
