"""The stage losses: per sample, one of the paper's cases, with that sample's own generated LoRA.

Stage 1 (Base-LoRA): trigger words, the Base-LoRA of the face-blurred image, diffusion loss on the image.
Stages 2-3 (ID-LoRA; facts §5.2 "three training cases switched at random"), drawn per sample:
    (a) trigger words, ID + Base          -> the diffusion target of the image
    (b) no trigger words, ID alone         -> the frozen base model's prediction (no gradient through it)
    (c) no trigger words, ID + Base        -> the Base-only prediction
(b) ties the ID-LoRA to the trigger words (without them it must change nothing); (c) keeps it from
re-learning what the Base-LoRA already carries. Every sample sees the same noisy latents in the
student and the teacher, so (b) is exactly zero when the ID-LoRA is zero.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from torch import nn

from ..conditioning.faces import FaceAnalyzer
from ..diffusion import noisy_inputs, snr_weights
from ..hypernet import HyperLoRA
from ..lora import LoRAWeights, functional_lora
from .config import StageConfig
from .identity_loss import FaceEmbedder, decode, face_boxes, identity_loss, sample_path, sampled_identity

CASES = ("a", "b", "c")


class LoRAGenerator(nn.Module):
    """The trained module: a HyperLoRA whose forward generates the batch's LoRAs (what DDP wraps)."""

    def __init__(self, hyperlora: HyperLoRA):
        super().__init__()
        self.hyperlora = hyperlora

    def forward(self, *, branch: str, clip=None, arcface=None) -> LoRAWeights:
        model = self.hyperlora
        if branch == "base":
            return model.assemble(model.base_coefficients(clip), "base")
        return model.assemble(model.id_coefficients(clip=clip, arcface=arcface), "id")


@torch.no_grad()
def base_coefficient_table(hyperlora: HyperLoRA, clip_base: torch.Tensor, *, batch_size: int = 64,
                           device=None, autocast=contextlib.nullcontext) -> torch.Tensor:  # fmt: skip
    """The frozen Base branch's coefficients of every training image, once: [N, Q, K] float32 on the CPU.

    In stages 2-3 the Base-LoRA of stage 1 is frozen, and an image's Base-LoRA depends on its face-blurred CLIP
    tokens alone, so its coefficients are a table; a step then only gathers its rows and assembles them, instead
    of running the Base resampler on the whole batch (0.17 s of a 1.8 s toy step, measured). Kept on the CPU: at
    SDXL's size a row is 0.57 MB (1,120 queries x K = 128), so 10,000 images would take 5.7 GB of a GPU."""
    rows = []
    for start in range(0, len(clip_base), batch_size):
        with autocast():
            features = clip_base[start : start + batch_size].to(device).float()
            rows.append(hyperlora.base_coefficients(features).float().cpu())
    return torch.cat(rows)


def take(lora: LoRAWeights, index: torch.Tensor) -> LoRAWeights:
    """The LoRAs of some samples of a batch."""
    return LoRAWeights({k: (d[index], u[index]) for k, (d, u) in lora.layers.items()}, lora.rank, lora.alpha)


def _unet(unet, noisy, timesteps, batch, rows=None) -> torch.Tensor:
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    added = {"text_embeds": pick(batch["text_embeds"]), "time_ids": pick(batch["time_ids"])}
    return unet(pick(noisy), pick(timesteps), pick(batch["encoder_hidden_states"]), added_cond_kwargs=added).sample


@dataclass
class IdentityTerm:
    """What the identity loss needs besides the batch: the frozen recogniser and VAE (`train.identity_loss`)."""

    embedder: FaceEmbedder
    vae: nn.Module
    analyzer: FaceAnalyzer | None = None  # finds the face generated along a sampling path (id_loss_path_steps)
    empty: tuple[torch.Tensor, torch.Tensor] | None = None  # the "" prompt's embeddings [1, 77, D], pooled [1, P]:
    # the unconditional branch of the path's classifier-free guidance


def stage_loss(generator_module: nn.Module, unet, scheduler: DDPMScheduler, batch: dict, stage: StageConfig, *,
               snr_gamma: float | None, rng: torch.Generator, has_base: bool,
               identity: IdentityTerm | None = None) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """The loss of one batch and, per case, its mean (for the log); with `identity` and stage.id_loss_weight, the
    identity loss is added on the case (a) samples below stage.id_loss_max_timestep (logged as loss_id)."""
    noisy, timesteps, target = noisy_inputs(scheduler, batch["latents"], rng, stage.max_timestep)
    weights = snr_weights(scheduler, timesteps, snr_gamma)
    case = batch["case"].to(noisy.device)
    if stage.stage == 1:
        base = generator_module(branch="base", clip=batch["clip_base"])
        with functional_lora(unet, [base], [1.0]):
            prediction = _unet(unet, noisy, timesteps, batch)
    else:
        inputs = {name: batch[name] for name in stage.inputs}
        lora = generator_module(branch="id", **inputs)
        if lora.batch_size != len(case):  # one LoRA per group of looks of one person
            lora = take(lora, batch["group"].to(noisy.device))
        use_base = has_base and stage.base_in_id_stages
        base = None
        if use_base:
            with torch.no_grad():  # the Base-LoRA of stage 1 stays frozen
                module = getattr(generator_module, "module", generator_module)
                if "base_coefficients" in batch:  # the rows of base_coefficient_table
                    base = module.hyperlora.assemble(batch["base_coefficients"], "base")
                else:
                    base = module(branch="base", clip=batch["clip_base"]).detach()
        base_scale = ((case == 0) | (case == 2)).float()
        teacher_rows = (case != 0).nonzero().squeeze(1)
        if len(teacher_rows):
            with torch.no_grad():  # (b): the base model; (c): Base-LoRA alone; same noisy latents
                loras = [take(base, teacher_rows)] if use_base else []
                with functional_lora(unet, loras, [base_scale[teacher_rows]] if use_base else []):
                    target = target.clone()
                    target[teacher_rows] = _unet(unet, noisy, timesteps, batch, teacher_rows).to(target.dtype)
        loras, scales = [lora], [torch.ones(len(case), device=noisy.device)]
        if use_base:
            loras.append(base)
            scales.append(base_scale)
        with functional_lora(unet, loras, scales):
            prediction = _unet(unet, noisy, timesteps, batch)
    error = F.mse_loss(prediction.float(), target.float(), reduction="none").mean(1)  # [B, h, w]
    per_sample = (error * face_weights(batch, error.shape[-2:], stage.face_loss_weight)).flatten(1).mean(1) * weights
    stats = {f"loss_{name}": float(per_sample[case == k].detach().mean()) for k, name in enumerate(CASES) if (case == k).any()}
    if stage.stage > 1 and stage.id_loss_weight and identity is not None:
        if "face_box" not in batch:
            raise ValueError("id_loss_weight > 0 needs the training set's face boxes: prepare the set again")
        has_box = ~batch["face_box"].isnan().any(1).to(case.device)
        if stage.id_loss_path_steps:  # PuLID's form: a face sampled from pure noise (see `path_identity`)
            captioned = (case == 0) & has_box & ~batch.get("dropped", torch.zeros_like(has_box)).to(case.device)
            rows = first_per_group(captioned, batch["group"].to(case.device))[: stage.id_loss_samples]
            if len(rows):
                term, found = path_identity(identity, unet, scheduler, batch, rows, loras, scales, stage, rng)
                per_sample = per_sample.index_add(0, rows[found], stage.id_loss_weight * term)
                stats["loss_id"] = float(term.detach().mean()) if len(term) else float("nan")
                stats["id_faces_found"] = len(term) / len(rows)
            free = (case != 0) & ~batch.get("dropped", torch.zeros_like(has_box)).to(case.device)
            rows = first_per_group(free, batch["group"].to(case.device))[: stage.id_loss_samples]
            if stage.id_decouple_weight and len(rows):  # no trigger words: the teacher's face, not the person's
                teacher = ([base], [base_scale]) if use_base else ([], [])
                term, found = path_decoupling(identity, unet, scheduler, batch, rows, (loras, scales), teacher, stage,
                                              rng)  # fmt: skip
                per_sample = per_sample.index_add(0, rows[found], stage.id_decouple_weight * term)
                stats["loss_decouple"] = float(term.detach().mean()) if len(term) else float("nan")
            return per_sample.mean(), stats
        rows = ((case == 0) & (timesteps < stage.id_loss_max_timestep) & has_box).nonzero().squeeze(1)
        if len(rows):
            term = identity_loss(identity.embedder, identity.vae, clean=batch["latents"][rows], noisy=noisy[rows], timesteps=timesteps[rows],
                                 prediction=prediction[rows], boxes=batch["face_box"][rows], scheduler=scheduler)  # fmt: skip
            per_sample = per_sample.index_add(0, rows, stage.id_loss_weight * term)
            stats["loss_id"] = float(term.detach().mean())
    return per_sample.mean(), stats


def first_per_group(eligible: torch.Tensor, group: torch.Tensor) -> torch.Tensor:
    """The first eligible sample of each group (one per person's LoRA), in group order."""
    rows = eligible.nonzero().squeeze(1)
    first = torch.ones_like(rows, dtype=torch.bool)
    first[1:] = group[rows][1:] != group[rows][:-1]
    return rows[first]


def guided(identity: IdentityTerm, unet, batch: dict, rows: torch.Tensor, loras: list[LoRAWeights],
           scales: list[torch.Tensor], guidance: float):  # fmt: skip
    """`denoise(latents, t)` for `sample_path`: the prompts of `rows` with their LoRAs and scales, on the
    conditional and the unconditional ("" prompt) branch alike, as at inference, at classifier-free `guidance`."""
    if identity.analyzer is None or identity.empty is None:
        raise ValueError("id_loss_path_steps > 0 needs a face analyzer and the empty prompt's embeddings")
    n, device = len(rows), batch["latents"].device
    both = torch.cat([rows, rows])
    empty, empty_pooled = (t.to(device, torch.float32) for t in identity.empty)
    cond = {"encoder_hidden_states": torch.cat([batch["encoder_hidden_states"][rows], empty.expand(n, -1, -1)]),
            "text_embeds": torch.cat([batch["text_embeds"][rows], empty_pooled.expand(n, -1)]),
            "time_ids": batch["time_ids"][both]}  # fmt: skip
    picked, picked_scales = [take(lora, both) for lora in loras], [scale[both] for scale in scales]

    def denoise(latents: torch.Tensor, t: int) -> torch.Tensor:
        with functional_lora(unet, picked, picked_scales):
            out = _unet(unet, torch.cat([latents, latents]), torch.full((2 * n,), t, device=device), cond)
        conditional, unconditional = out.float().chunk(2)
        return unconditional + guidance * (conditional - unconditional)

    return denoise


def path_identity(identity: IdentityTerm, unet, scheduler: DDPMScheduler, batch: dict, rows: torch.Tensor,
                  loras: list[LoRAWeights], scales: list[torch.Tensor], stage: StageConfig,
                  rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The identity loss on faces sampled from pure noise: for each of `rows`, its prompt, LoRAs and scales
    (`guided`) along `stage.id_loss_path_steps` DDIM steps at guidance `stage.id_loss_guidance`; each found face
    against the recogniser's embedding of the row's own image.
    Returns (1 - cosine [F], the positions in `rows` where a face was found [F])."""
    denoise = guided(identity, unet, batch, rows, loras, scales, stage.id_loss_guidance)
    noise = torch.randn(batch["latents"][rows].shape, generator=rng).to(batch["latents"].device)
    latents = sample_path(denoise, noise, scheduler, stage.id_loss_path_steps)
    with torch.no_grad():
        goal = identity.embedder(decode(identity.vae, batch["latents"][rows]), batch["face_box"][rows])
    return sampled_identity(identity.embedder, identity.vae, identity.analyzer, latents, goal,
                            views=stage.id_loss_views, jitter=stage.id_loss_jitter, generator=rng)  # fmt: skip


def path_decoupling(identity: IdentityTerm, unet, scheduler: DDPMScheduler, batch: dict, rows: torch.Tensor,
                    student: tuple[list, list], teacher: tuple[list, list], stage: StageConfig,
                    rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The decoupling term on faces sampled from pure noise: for each of `rows` (prompts without trigger words),
    the face its `student` (LoRAs, scales) samples should be the face its `teacher` samples from the same noise
    (case b: the base model, no LoRA; c: the Base-LoRA alone), read by the recogniser: the paper's cases (b) and (c)
    asked of the whole sampling path instead of one noisy step. No gradient through the teacher.
    Returns (1 - cosine [F], the positions in `rows` where both faces were found [F])."""
    steps, guidance = stage.id_loss_path_steps, stage.id_loss_guidance
    noise = torch.randn(batch["latents"][rows].shape, generator=rng).to(batch["latents"].device)
    with torch.no_grad():
        pixels = decode(identity.vae, sample_path(guided(identity, unet, batch, rows, *teacher, guidance), noise,
                                                  scheduler, steps))  # fmt: skip
        boxes = face_boxes(identity.analyzer, pixels)
        kept = (~boxes.isnan().any(1)).nonzero().squeeze(1)
        if not len(kept):
            return noise.new_zeros(0), kept
        goal = identity.embedder(pixels[kept], boxes[kept])
    kept = kept.to(rows.device)
    latents = sample_path(guided(identity, unet, batch, rows[kept], *student, guidance), noise[kept], scheduler, steps)
    term, found = sampled_identity(identity.embedder, identity.vae, identity.analyzer, latents, goal,
                                   views=stage.id_loss_views, jitter=stage.id_loss_jitter, generator=rng)  # fmt: skip
    return term, kept[found]


def face_weights(batch: dict, size: tuple[int, int], weight: float) -> torch.Tensor | float:
    """Per-pixel loss weights [B, h, w]: 1 + weight inside each image's face box (latent cells whose centre lies in
    it), scaled so each image's weights average 1; 1.0 when weight is 0. Images without a face box get 1s."""
    if weight == 0:
        return 1.0
    if "face_box" not in batch:
        raise ValueError("face_loss_weight > 0 needs the training set's face boxes: this set was prepared before "
                         "they were kept; prepare it again (a toy pool is re-encoded by deleting its cache folder)")
    box = batch["face_box"].float()
    h, w = size
    ys = (torch.arange(h, device=box.device) + 0.5) / h
    xs = (torch.arange(w, device=box.device) + 0.5) / w
    inside_x = (xs[None] >= box[:, 0, None]) & (xs[None] <= box[:, 2, None])  # [B, w]; NaN boxes: False
    inside_y = (ys[None] >= box[:, 1, None]) & (ys[None] <= box[:, 3, None])  # [B, h]
    weights = 1.0 + weight * (inside_y[:, :, None] & inside_x[:, None, :]).float()
    return weights / weights.flatten(1).mean(1)[:, None, None]


@torch.no_grad()
def reference_gap(generator_module: nn.Module, unet, scheduler: DDPMScheduler, batch: dict, stage: StageConfig, *,
                  rng_seed: int, has_base: bool) -> dict:  # fmt: skip
    """Case (a)'s loss with each sample's own reference against another person's (rolled by half the batch),
    at the same noise and timesteps, and the mean coefficient cosine between different people: the gap and the
    cosine say whether the LoRA carries the person or one generic change."""
    out = {}  # the validation set is grouped by person: half a batch away is someone else
    keys = ("clip_base",) if stage.stage == 1 else ("clip", "arcface")
    for name, shifted_by_half in (("right", False), ("shuffled", True)):
        shifted = dict(batch, case=torch.zeros_like(batch["case"]))
        shifted.update({k: batch[k].roll(len(batch[k]) // 2 if shifted_by_half else 0, 0) for k in keys})
        loss, _ = stage_loss(generator_module, unet, scheduler, shifted, stage, snr_gamma=None,
                             rng=torch.Generator().manual_seed(rng_seed), has_base=has_base)  # fmt: skip
        out[f"val_loss_{name}"] = float(loss)
    out["val_gap"] = out["val_loss_shuffled"] - out["val_loss_right"]
    module = getattr(generator_module, "module", generator_module).hyperlora
    if stage.stage == 1:
        coefficients = module.base_coefficients(batch["clip_base"])
    else:
        coefficients = module.id_coefficients(**{name: batch[name] for name in stage.inputs})
    out["val_coefficient_cosine"] = coefficient_cosine(coefficients, batch["person"])
    return out


def coefficient_cosine(coefficients: torch.Tensor, person: torch.Tensor) -> float:
    """Mean cosine between the flattened coefficient vectors [N, Q, K] of different people (1.0: one generic LoRA
    for everyone; the unit-norm tokens make each vector's norm sqrt(Q), so this is the mean per-token cosine)."""
    flat = F.normalize(coefficients.flatten(1).float(), dim=-1)
    cosine = flat @ flat.T
    different = person[:, None] != person[None, :]
    return float(cosine[different].mean()) if different.any() else float("nan")
