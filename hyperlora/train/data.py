"""Training data: every frozen encoder's output for a pool of images, computed once, and seeded batches from it.

A `TrainingSet` holds, per image: VAE latent moments, the caption's text states with and without the
trigger words, the ID branch's features (CLIP tokens of the masked face crop, the ArcFace embedding) of
the image and of an augmented copy of it (flip, crop and scale jitter: the "self" reference), the Base
branch's CLIP tokens of the face-blurred image, the person it shows and SDXL's six time ids. Both
worlds produce one: `toy_training_set` renders train-split people here; `hyperlora.train.folder` reads
a prepared photo folder. Latents are grouped in buckets of one latent shape (SDXL's aspect-ratio
buckets; the toy world has one); a batch comes from one bucket.

`sample_batch(set, ..., generator)` depends only on the generator, which the loop seeds from
(seed, stage, step, micro-step, process): a resumed run draws exactly the batches it would have.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from dataclasses import dataclass, fields
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from ..conditioning.images import ConditioningError
from ..conditioning.references import Conditioner
from ..pipeline import with_trigger
from .config import StageConfig, TrainConfig

logger = logging.getLogger(__name__)

TRAINING_SET_FILE = "training_set.safetensors"


def step_seed(*keys: int) -> int:
    """A 63-bit seed from integer keys (seed, stage, step, micro-step, process)."""
    return int(np.random.SeedSequence([int(k) for k in keys]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class TrainingSet:
    """Per image i (rows of equal length N); latents by bucket: latent_mean[bucket[i]][row[i]]."""

    latent_mean: list[torch.Tensor]  # per bucket [n_b, C, h, w], unscaled VAE posterior mean
    latent_std: list[torch.Tensor]  # per bucket [n_b, C, h, w]
    bucket: torch.Tensor  # [N] long: which latent bucket
    row: torch.Tensor  # [N] long: the row inside the bucket
    person: torch.Tensor  # [N] long: who it shows (another image of the same person is an "other" reference)
    time_ids: torch.Tensor  # [N, 6] SDXL's original size, crop corner, target size
    trigger_embeds: torch.Tensor  # [N, 77, D] fp16: "trigger words, caption"
    trigger_pooled: torch.Tensor  # [N, P]
    plain_embeds: torch.Tensor  # [N, 77, D] fp16: the caption alone
    plain_pooled: torch.Tensor  # [N, P]
    empty_embeds: torch.Tensor  # [1, 77, D]: "" (caption dropout)
    empty_pooled: torch.Tensor  # [1, P]
    clip_id: torch.Tensor  # [N, T, H] fp16: CLIP hidden_states[-2] of the masked face crop
    arcface: torch.Tensor  # [N, E]: the identity embedding
    clip_id_aug: torch.Tensor  # [N, T, H]: the same of an augmented copy (the "self" reference)
    arcface_aug: torch.Tensor  # [N, E]
    clip_base: torch.Tensor  # [N, T, H] fp16: CLIP tokens of the face-blurred image (Base branch)
    valid: torch.Tensor  # [N] bool: face analysis succeeded on the image and on its augmented copy
    scaling_factor: float = 1.0  # the VAE's latent scaling
    face_box: torch.Tensor | None = None  # [N, 4] the detected face box x1, y1, x2, y2 as fractions of the training
    # image's width and height (NaN where no face): where StageConfig.face_loss_weight weights the loss. None: a set
    # prepared before face boxes were kept

    def __len__(self) -> int:
        return len(self.person)

    def save(self, path: str | Path, meta: dict) -> Path:
        tensors = {f.name: getattr(self, f.name) for f in fields(self) if torch.is_tensor(getattr(self, f.name))}
        for i, (mean, std) in enumerate(zip(self.latent_mean, self.latent_std)):
            tensors[f"latent_mean.{i}"], tensors[f"latent_std.{i}"] = mean, std
        metadata = {"meta": json.dumps(meta), "scaling_factor": str(self.scaling_factor),
                    "buckets": str(len(self.latent_mean))}  # fmt: skip
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> tuple[TrainingSet, dict]:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata()
        tensors = load_file(str(path))
        n = int(metadata["buckets"])
        values = {f.name: tensors[f.name] for f in fields(cls) if f.name in tensors}
        values["latent_mean"] = [tensors[f"latent_mean.{i}"] for i in range(n)]
        values["latent_std"] = [tensors[f"latent_std.{i}"] for i in range(n)]
        return cls(**values, scaling_factor=float(metadata["scaling_factor"])), json.loads(metadata["meta"])

    def others(self) -> list[torch.Tensor]:
        """For each image, the indices of the other valid images of the same person."""
        valid = self.valid.nonzero().squeeze(1)
        by_person: dict[int, list[int]] = {}
        for i in valid.tolist():
            by_person.setdefault(int(self.person[i]), []).append(i)
        return [torch.tensor([j for j in by_person.get(int(p), []) if j != i], dtype=torch.long)
                for i, p in enumerate(self.person.tolist())]  # fmt: skip


def _draw_targets(data: TrainingSet, others: list[torch.Tensor], stage: StageConfig, run: TrainConfig,
                  generator: torch.Generator) -> torch.Tensor:
    """batch_size image indices of one bucket, in groups of `targets_per_reference` looks of one person."""
    m = stage.targets_per_reference
    if run.batch_size % m:
        raise ValueError(f"batch_size {run.batch_size} is not a multiple of targets_per_reference {m}")
    valid = data.valid.nonzero().squeeze(1)
    buckets = data.bucket[valid]
    counts = torch.bincount(buckets, minlength=len(data.latent_mean)).float()
    bucket = int(torch.multinomial(counts, 1, generator=generator))  # a bucket in proportion to its images
    pool = valid[buckets == bucket]
    anchors = pool[torch.randint(len(pool), (run.batch_size // m,), generator=generator)]
    index = []
    for anchor in anchors.tolist():
        same = others[anchor][data.bucket[others[anchor]] == bucket]
        picks = same[torch.randint(len(same), (m - 1,), generator=generator)] if len(same) else [anchor] * (m - 1)
        index += [anchor, *(int(p) for p in picks)]
    return torch.tensor(index, dtype=torch.long)


def sample_batch(data: TrainingSet, others: list[torch.Tensor], stage: StageConfig, run: TrainConfig,
                 generator: torch.Generator, index: torch.Tensor | None = None) -> dict:  # fmt: skip
    """One batch: latents sampled from their moments, text states, reference and Base features, the cases.

    The images come in groups of `stage.targets_per_reference` looks of one person that share one reference
    (`clip`, `arcface` have one row per group; `group` maps each image to its row), so the hypernetwork runs
    once per group. `index` fixes the images instead (one bucket, groups of one); by default they are drawn."""
    m = 1 if index is not None else stage.targets_per_reference
    if index is None:
        index = _draw_targets(data, others, stage, run, generator)
    bucket = int(data.bucket[index[0]])
    if (data.bucket[index] != bucket).any():
        raise ValueError("a batch must come from one latent bucket")
    rows = data.row[index]
    noise = torch.randn(data.latent_mean[bucket][rows].shape, generator=generator)
    latents = (data.latent_mean[bucket][rows] + data.latent_std[bucket][rows] * noise) * data.scaling_factor
    # one reference per group: the first image's augmented copy ("self"), or another image of the person
    anchors = index[::m]
    reference, from_self = anchors.clone(), torch.ones(len(anchors), dtype=torch.bool)
    if stage.reference == "other":
        for k, i in enumerate(anchors.tolist()):
            if len(others[i]):
                reference[k] = others[i][torch.randint(len(others[i]), (1,), generator=generator)]
                from_self[k] = False
    clip_id = torch.where(from_self[:, None, None], data.clip_id_aug[reference], data.clip_id[reference])
    arcface = torch.where(from_self[:, None], data.arcface_aug[reference], data.arcface[reference])
    case = torch.multinomial(torch.tensor(stage.case_probs), len(index), replacement=True, generator=generator)
    if stage.stage == 1:
        case.zero_()  # stage 1 has one case: trigger words, Base-LoRA on, the target image
    drop = (torch.rand(len(index), generator=generator) < run.caption_dropout) & (case == 0)
    trigger = case == 0
    embeds = torch.where(trigger[:, None, None], data.trigger_embeds[index], data.plain_embeds[index]).float()
    pooled = torch.where(trigger[:, None], data.trigger_pooled[index], data.plain_pooled[index]).float()
    embeds = torch.where(drop[:, None, None], data.empty_embeds.float(), embeds)
    pooled = torch.where(drop[:, None], data.empty_pooled.float(), pooled)
    return {
        "latents": latents, "encoder_hidden_states": embeds, "text_embeds": pooled, "time_ids": data.time_ids[index].float(),
        "clip": clip_id.float(), "arcface": arcface.float(), "clip_base": data.clip_base[index].float(), "case": case,
        "group": torch.arange(len(anchors)).repeat_interleave(m), "index": index, "reference": reference,
        "person": data.person[reference], "dropped": drop,
        **({"face_box": data.face_box[index]} if data.face_box is not None else {}),
    }  # fmt: skip


def fixed_batch(data: TrainingSet, others: list[torch.Tensor], stage: StageConfig, run: TrainConfig, *,
                size: int, seed: int) -> dict:
    """A validation batch: the first `size` valid images of the first bucket (grouped by person), case (a) for
    every sample, no caption dropout; noise and references drawn once from `seed`."""
    valid = data.valid.nonzero().squeeze(1)
    index = valid[data.bucket[valid] == data.bucket[valid[0]]][:size]
    stage = dataclasses.replace(stage, case_probs=(1.0, 0.0, 0.0))
    run = dataclasses.replace(run, caption_dropout=0.0, batch_size=len(index))
    return sample_batch(data, others, stage, run, torch.Generator().manual_seed(seed), index=index)


# --- encoding a pool of images ------------------------------------------------------------------


def augment(image: Image.Image, rng: np.random.Generator) -> Image.Image:
    """The "self" reference: a horizontal flip (half the time), a scale jitter of +-10 % and a shift of up to 6 %."""
    w, h = image.size
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    scale = rng.uniform(0.9, 1.1)
    dx, dy = rng.uniform(-0.06, 0.06, size=2) * (w, h)
    side_w, side_h = w / scale, h / scale
    left, top = (w - side_w) / 2 + dx, (h - side_h) / 2 + dy
    return image.transform((w, h), Image.Transform.EXTENT, (left, top, left + side_w, top + side_h),
                           resample=Image.Resampling.BICUBIC, fillcolor=(127, 127, 127))  # fmt: skip


def _conditioning(conditioner: Conditioner, images: list[Image.Image], dims: tuple[int, int, int]):
    """Per image: (clip_id, arcface, clip_base, ok, face_box as fractions of the image); failed images get zero rows
    (NaN boxes) and ok False."""
    tokens, hidden, embed_dim = dims
    face_box = torch.full((len(images), 4), float("nan"))
    clip_id = torch.zeros(len(images), tokens, hidden)
    clip_base = torch.zeros(len(images), tokens, hidden)
    arcface = torch.zeros(len(images), embed_dim)
    ok = torch.zeros(len(images), dtype=torch.bool)
    crops, bases, rows = [], [], []
    for i, image in enumerate(images):
        try:
            crop, embedding, base, _, _, box = conditioner.prepare(image, f"image {i}")
        except ConditioningError as err:
            logger.debug("image %d skipped: %s", i, err)
            continue
        face_box[i] = torch.tensor(box) / torch.tensor([image.width, image.height] * 2)
        crops.append(crop)
        bases.append(base)
        arcface[i] = torch.from_numpy(np.asarray(embedding, np.float32))
        rows.append(i)
    if rows:
        ok[rows] = True
        clip_id[rows] = conditioner.clip(crops).float().cpu()
        clip_base[rows] = conditioner.clip(bases).float().cpu()
    return clip_id, arcface, clip_base, ok, face_box


@torch.no_grad()
def encode_latents_and_text(pipe, images: list[Image.Image], captions: list[str], trigger_words: str) -> dict:
    """Same-size images and their captions -> VAE latent moments and both prompts' text states (with and
    without the trigger words), batched as TrainingSet rows."""
    vae = pipe.vae
    pixels = torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])
    dist = vae.encode(pixels.to(vae.device).float().div(127.5).sub(1).to(vae.dtype)).latent_dist
    encoded = {"latent_mean": dist.mean.float().cpu(), "latent_std": dist.std.float().cpu()}
    for key, prompts in (("trigger", [with_trigger(t, trigger_words) for t in captions]), ("plain", captions)):
        e, _, p, _ = pipe.encode_prompt(prompts, device=vae.device, do_classifier_free_guidance=False)
        encoded[f"{key}_embeds"], encoded[f"{key}_pooled"] = e.half().cpu(), p.half().cpu()
    return encoded


@torch.no_grad()
def encode_images(images: list[Image.Image], captions: list[str], persons: list[int], *, pipe,
                  conditioner: Conditioner, trigger_words: str, size: tuple[int, int], seed: int,
                  chunk: int = 64, progress: bool = True) -> TrainingSet:  # fmt: skip
    """A pool of same-size images -> a one-bucket TrainingSet (the frozen VAE, text encoders, face models and CLIP)."""
    if not (len(images) == len(captions) == len(persons)) or not images:
        raise ValueError(f"{len(images)} images, {len(captions)} captions, {len(persons)} persons: need equal, > 0")
    rng = np.random.default_rng(seed)
    hidden = conditioner.clip.hidden_size
    tokens = conditioner.clip.encode_pixels(conditioner.clip.pixel_values([images[0]])).shape[1]
    dims = (tokens, hidden, int(getattr(conditioner.analyzer, "embedding_dim", 512)))
    parts: dict[str, list[torch.Tensor]] = {}
    vae = pipe.vae
    for start in tqdm(range(0, len(images), chunk), desc="encoding the training pool", disable=not progress,
                      mininterval=5):  # fmt: skip
        batch, text = images[start : start + chunk], captions[start : start + chunk]
        encoded = encode_latents_and_text(pipe, batch, text, trigger_words)
        clip_id, arcface, clip_base, ok, face_box = _conditioning(conditioner, batch, dims)
        clip_aug, arc_aug, _, ok_aug, _ = _conditioning(conditioner, [augment(im, rng) for im in batch], dims)
        encoded |= {"clip_id": clip_id.half(), "arcface": arcface, "clip_base": clip_base.half(),
                    "clip_id_aug": clip_aug.half(), "arcface_aug": arc_aug, "valid": ok & ok_aug,
                    "face_box": face_box}  # fmt: skip
        for key, value in encoded.items():
            parts.setdefault(key, []).append(value)
    empty, _, empty_pooled, _ = pipe.encode_prompt("", device=vae.device, do_classifier_free_guidance=False)
    joined = {k: torch.cat(v) for k, v in parts.items()}
    n = len(images)
    h, w = size
    return TrainingSet(
        latent_mean=[joined.pop("latent_mean")], latent_std=[joined.pop("latent_std")],
        bucket=torch.zeros(n, dtype=torch.long), row=torch.arange(n), person=torch.tensor(persons, dtype=torch.long),
        time_ids=torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).repeat(n, 1),
        empty_embeds=empty.half().cpu(), empty_pooled=empty_pooled.half().cpu(),
        scaling_factor=float(vae.config.scaling_factor), **joined,
    )  # fmt: skip


def cache_key(values: dict) -> str:
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def toy_training_set(run: TrainConfig, pipe, conditioner: Conditioner, trigger_words: str,
                     cache_dir: str | Path, *, split: str = "train", num_identities: int | None = None,
                     progress: bool = True) -> TrainingSet:  # fmt: skip
    """Render `num_identities` people of `split` x images_per_identity looks, encode them once, cache the result.

    The cache file is named by everything it depends on (split, people, looks, seed, model folders, trigger
    words), so stages and resumed runs share it and a change of any of them builds a new one.
    """
    from ..toy.identity import split_identities
    from ..toy.render import render_sample

    n_people = num_identities or run.num_identities
    spec = {"split": split, "people": n_people, "looks": run.images_per_identity, "seed": run.data_seed,
            "pipeline": str(Path(run.pipeline).resolve()), "clip": str(Path(run.clip).resolve()),
            "faces": str(Path(run.faces).resolve()), "trigger_words": trigger_words,
            "face_box": True}  # fmt: skip
    # ("face_box": sets cached before the face boxes were kept are encoded again)
    path = Path(cache_dir) / f"{split}-{cache_key(spec)}" / TRAINING_SET_FILE
    if path.is_file():
        data, _ = TrainingSet.load(path)
        logger.info("training set from cache %s (%d images)", path, len(data))
        return data
    people = split_identities(split)[:n_people]
    renders = [render_sample(p, k, run.data_seed) for p in people for k in range(run.images_per_identity)]
    images = [Image.fromarray(r.image) for r in renders]
    data = encode_images(images, [r.caption for r in renders], [r.identity for r in renders], pipe=pipe,
                         conditioner=conditioner, trigger_words=trigger_words, size=renders[0].image.shape[:2],
                         seed=run.data_seed, progress=progress)  # fmt: skip
    failed = int((~data.valid).sum())
    if failed:
        logger.warning("%d of %d pool images had no usable face (or augmented face) and are left out", failed, len(data))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")  # one per process: two runs encoding the same pool at once
    data.save(tmp, spec | {"captions": [r.caption for r in renders]})
    tmp.replace(path)
    return data
