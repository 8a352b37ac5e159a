"""Evaluation metrics as pure functions over extracted features (k-diffusion's `fid(x, y)` style).

Embeddings come from eval/extractors.py (numpy or torch, one row per image, rows paired by index);
attributes are dicts {look attribute: value}. The two LPIPS metrics take images plus an
`LPIPSModel`, because masking happens in pixel space. Every function returns a dict whose headline
key names the metric, its role and its scale, so a table cannot mix HyperLoRA's and PuLID's
conventions:

    id_similarity       id_sim (failures count 0), id_sim_detected, failure_rate
    clip_t              clip_t_cosine (HyperLoRA, ~0.24), clip_t_x100 (PuLID, ~31)
    clip_i_fidelity     clip_i_fidelity: generated vs reference face crop (HyperLoRA's CLIP-I)
    clip_i_disruption   clip_i_disruption: generated vs same-seed image without the LoRA (PuLID's CLIP-I)
    lpips_diversity     lpips_diversity: pairwise across seeds of one prompt and identity
    lpips_preservation  lpips_preservation: vs the same seed without the LoRA, face masked out
    face_texture        face_texture: high-frequency energy inside the face box (paired differences only)
    keypoint_error      error_px, error_iod, detection_rate: detected face keypoints vs a control's (ControlNet)
    look_leakage        leakage_mean: copies of the reference's look the prompt asked to change (toy)
    prompt_adherence    adherence_mean: prompted look values present in the image (toy)
    summarize           mean, std, n (+ spread over seeds)

LPIPS results carry `lpips_real`: False means a random trunk (see extractors.LPIPSModel).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .extractors import LPIPSModel, image_batch

# ---------------------------------------------------------------------------------------------
# Embedding metrics


def _matrix(x, what: str) -> np.ndarray:
    """Embeddings -> float64 [N, D]; a single [D] vector becomes [1, D]."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().double().numpy()
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"{what} must be [N, D] or [D], got shape {list(x.shape)}")
    return x


def _paired_cosine(a, b, what: str) -> np.ndarray:
    """Row-wise cosine of paired embeddings [N]; a single row on either side is broadcast."""
    a, b = _matrix(a, f"{what} (first)"), _matrix(b, f"{what} (second)")
    if a.shape[1] != b.shape[1] or (len(a) != len(b) and 1 not in (len(a), len(b))):
        raise ValueError(f"{what}: cannot pair embeddings of shapes {list(a.shape)} and {list(b.shape)}")
    norms = np.linalg.norm(a, axis=1, keepdims=True), np.linalg.norm(b, axis=1, keepdims=True)
    if not (np.all(np.isfinite(a)) and np.all(np.isfinite(b))) or (norms[0] == 0).any() or (norms[1] == 0).any():
        raise ValueError(f"{what}: embeddings must be finite and non-zero")
    return np.sum((a / norms[0]) * (b / norms[1]), axis=1)


def id_similarity(ref_embeddings, gen_embeddings) -> dict:
    """Face similarity as in PuLID Table 1 / HyperLoRA "ID Sim.": cosine of face-recognition embeddings.

    ref_embeddings: [N, D], or [D] for one reference shared by all. gen_embeddings: a list of [D]
    embeddings with None where no face was detected, or an array [N, D] with NaN rows for those.
    Failures score 0 in `id_sim` and `per_image` (our protocol, peers-and-protocols §2);
    `id_sim_detected` averages over detected faces only. Report both with `failure_rate`.
    """
    if isinstance(gen_embeddings, (np.ndarray, torch.Tensor)):
        rows = list(_matrix(gen_embeddings, "gen_embeddings"))
    else:
        rows = list(gen_embeddings)
    if not rows:
        raise ValueError("id_similarity needs at least one generated image")
    detected = np.array([r is not None and bool(np.all(np.isfinite(np.asarray(r, dtype=np.float64)))) for r in rows])
    refs = _matrix(ref_embeddings, "ref_embeddings")
    if len(refs) not in (1, len(rows)):
        raise ValueError(f"{len(refs)} reference embeddings for {len(rows)} generated images")
    per_image = np.zeros(len(rows))
    if detected.any():
        gen = np.stack([np.asarray(r, dtype=np.float64).ravel() for r, d in zip(rows, detected) if d])
        per_image[detected] = _paired_cosine(refs if len(refs) == 1 else refs[detected], gen, "id_similarity")
    return {
        "id_sim": float(per_image.mean()),
        "id_sim_detected": float(per_image[detected].mean()) if detected.any() else float("nan"),
        "failure_rate": float(1.0 - detected.mean()),
        "n": len(rows),
        "n_failed": int((~detected).sum()),
        "per_image": per_image,
        "detected": detected,
    }


def clip_t(image_embeds, text_embeds) -> dict:
    """CLIP-T: cosine of image and prompt embeddings, raw (HyperLoRA's scale) and x100 (PuLID's scale).

    text_embeds: [N, D] paired with the images, or [D] for one prompt shared by all.
    """
    cosine = _paired_cosine(image_embeds, text_embeds, "clip_t")
    mean = float(cosine.mean())
    return {"clip_t_cosine": mean, "clip_t_x100": 100.0 * mean, "per_image_cosine": cosine, "n": len(cosine)}


def clip_i(a_embeds, b_embeds, *, role: str) -> dict:
    """CLIP-I: cosine of paired CLIP image embeddings; `role` names what is compared (the headline key is clip_i_<role>)."""
    if not role or not role.isidentifier():
        raise ValueError(f"role must name what CLIP-I compares (e.g. 'fidelity'), got {role!r}")
    cosine = _paired_cosine(a_embeds, b_embeds, f"clip_i_{role}")
    return {f"clip_i_{role}": float(cosine.mean()), "role": role, "per_image": cosine, "n": len(cosine)}


def clip_i_fidelity(generated_embeds, reference_embeds) -> dict:
    """HyperLoRA's CLIP-I (fidelity): generated image vs the reference face crop."""
    return clip_i(generated_embeds, reference_embeds, role="fidelity")


def clip_i_disruption(generated_embeds, no_lora_embeds) -> dict:
    """PuLID's CLIP-I (disruption; higher = less disruption): generated vs the same-seed image without the LoRA."""
    return clip_i(generated_embeds, no_lora_embeds, role="disruption")


def pixel_change(images, baseline_images) -> dict:
    """How much a LoRA changes the images: the mean absolute pixel difference (in [0, 1], whole image, every
    channel) to the same-seed image without it. Model-free, so it is real in every world (issue 17's figure 4:
    the ID-LoRA without its trigger words should change little)."""
    x, y = image_batch(images), image_batch(baseline_images)
    if x.shape != y.shape:
        raise ValueError(f"images {list(x.shape)} and baseline_images {list(y.shape)} must be paired and the same size")
    per_image = (x - y).abs().flatten(1).mean(1).numpy().astype(np.float64)
    return {"pixel_change": float(per_image.mean()), "per_image": per_image, "n": len(per_image)}


def face_texture(images, masks) -> dict:
    """How busy each generated face is: the mean absolute 4-neighbour Laplacian (every channel, pixels in [0, 1])
    inside its face mask (bool [N, H, W]). Model-free, so real in every world; it reads as a paired difference to a
    control on the same people, prompts and seeds (an identity loss that fools its recogniser with colour blotches
    raises it; issue 17), not as an absolute, since it scales with the image size and the person's own features."""
    x = image_batch(images)  # [N, 3, H, W] in [0, 1]
    masks = torch.as_tensor(np.asarray(masks, dtype=bool))
    if masks.shape != (x.shape[0], *x.shape[-2:]):
        raise ValueError(f"masks must be bool [N, H, W] = {[x.shape[0], *x.shape[-2:]]}, got {list(masks.shape)}")
    lap = (4 * x[..., 1:-1, 1:-1] - x[..., :-2, 1:-1] - x[..., 2:, 1:-1] - x[..., 1:-1, :-2] - x[..., 1:-1, 2:]).abs()
    inside = masks[:, 1:-1, 1:-1].float()
    per_image = (lap.mean(1) * inside).flatten(1).sum(1) / inside.flatten(1).sum(1).clamp(min=1)
    per_image = torch.where(inside.flatten(1).any(1), per_image, torch.nan).numpy().astype(np.float64)
    return {"face_texture": float(np.nanmean(per_image)) if np.isfinite(per_image).any() else float("nan"),
            "per_image": per_image, "n": int(np.isfinite(per_image).sum())}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Pose


def keypoint_error(detected_kps, target_kps) -> dict:
    """Pose following (a ControlNet's): mean distance of the detected face's five keypoints from the control's.

    detected_kps: per image a [5, 2] array in pixels, None where no face was detected; target_kps: [N, 5, 2] (or
    one [5, 2] shared by all). Per image the mean over the five points, in pixels (`error_px`) and divided by the
    target's inter-ocular distance (`error_iod`, scale-free: 0.1 is a tenth of the eye spacing). Images without a
    face are left out of both means and counted in `detection_rate`.
    """
    rows = list(detected_kps)
    if not rows:
        raise ValueError("keypoint_error needs at least one image")
    targets = np.asarray(target_kps, dtype=np.float64)
    targets = np.broadcast_to(targets, (len(rows), 5, 2)) if targets.shape == (5, 2) else targets
    if targets.shape != (len(rows), 5, 2):
        raise ValueError(f"target_kps must be [5, 2] or [{len(rows)}, 5, 2], got {list(np.shape(target_kps))}")
    detected = np.array([r is not None for r in rows])
    px, iod = np.full(len(rows), np.nan), np.full(len(rows), np.nan)
    for i in np.flatnonzero(detected):
        points = np.asarray(rows[i], dtype=np.float64)
        if points.shape != (5, 2):
            raise ValueError(f"detected_kps[{i}] must be [5, 2], got {list(points.shape)}")
        px[i] = np.linalg.norm(points - targets[i], axis=1).mean()
        iod[i] = px[i] / np.linalg.norm(targets[i, 1] - targets[i, 0])
    mean = lambda v: float(np.mean(v[detected])) if detected.any() else float("nan")
    return {"error_px": mean(px), "error_iod": mean(iod), "detection_rate": float(detected.mean()),
            "n": len(rows), "per_image_px": px, "per_image_iod": iod, "detected": detected}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# LPIPS


def lpips_diversity(images_per_prompt: Sequence, model: LPIPSModel) -> dict:
    """PhotoMaker's "Face Div." / Arc2Face's LPIPS: mean pairwise LPIPS across seeds of one prompt and identity.

    images_per_prompt: one image batch per (prompt, identity) group, each with >= 2 seeds.
    """
    per_group, n_pairs = [], 0
    for g, group in enumerate(images_per_prompt):
        batch = image_batch(group)
        if len(batch) < 2:
            raise ValueError(f"group {g}: diversity needs >= 2 images (seeds), got {len(batch)}")
        i, j = map(list, zip(*itertools.combinations(range(len(batch)), 2)))
        per_group.append(float(model.distance(batch[i], batch[j]).mean()))
        n_pairs += len(i)
    if not per_group:
        raise ValueError("lpips_diversity needs at least one group")
    per_group = np.array(per_group)
    return {"lpips_diversity": float(per_group.mean()), "per_group": per_group, "n_pairs": n_pairs,
            "lpips_real": model.real, "lpips_model": model.name}  # fmt: skip


def lpips_preservation(images, baseline_images, face_masks, model: LPIPSModel, *, fill: float = 0.5) -> dict:
    """Non-face preservation (PuLID's "elements kept before and after ID insertion", as LPIPS): generated vs
    the same-seed image without the LoRA, outside the face (lower = better preserved).

    face_masks: bool [N, H, W], True on the face. Method: the face region is filled with the same
    gray (`fill`, in [0, 1]) in both images, so nothing inside it can differ; LPIPS' spatial map is
    then averaged over the pixels outside the mask only, so the score does not shrink as the face
    grows. Changes just outside the face still count, including what the trunk's receptive field
    sees across the boundary.
    """
    x, y = image_batch(images), image_batch(baseline_images)
    if x.shape != y.shape:
        raise ValueError(f"images {list(x.shape)} and baseline_images {list(y.shape)} must be paired and the same size")
    masks = torch.as_tensor(np.asarray(face_masks)).bool()
    if masks.shape != (x.shape[0], *x.shape[2:]):
        raise ValueError(f"face_masks must be bool [N, H, W] = {[x.shape[0], *x.shape[2:]]}, got {list(masks.shape)}")
    outside = (~masks).flatten(1).sum(1)
    if (outside == 0).any():
        raise ValueError(f"face masks cover the whole image for images {torch.nonzero(outside == 0).flatten().tolist()}")
    keep = (~masks)[:, None].float()  # [N, 1, H, W]
    x, y = x * keep + fill * (1 - keep), y * keep + fill * (1 - keep)
    spatial = model.distance(x, y, spatial=True)  # [N, H, W]
    per_image = ((spatial * keep[:, 0]).flatten(1).sum(1) / outside).numpy().astype(np.float64)
    return {"lpips_preservation": float(per_image.mean()), "per_image": per_image, "n": len(per_image),
            "lpips_real": model.real, "lpips_model": model.name}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Look attributes (toy world: ground truth exists)


def _check_lengths(**lists) -> int:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"attribute lists must be paired by image, got lengths {lengths}")
    return next(iter(lengths.values()))


def look_leakage(predicted_attrs: Sequence[Mapping[str, str]], reference_attrs: Sequence[Mapping[str, str]],
                 prompt_attrs: Sequence[Mapping[str, str]]) -> dict:  # fmt: skip
    """Look leakage (HyperLoRA's motivation for the ID/Base split, measured): how often the image copies the
    reference's value of an attribute when the prompt asked for a different one.

    Per image and attribute the prompt names: eligible when the reference shows a value for it that
    differs from the prompt's; leaked when the predicted value equals the reference's (a missing
    prediction is no leak). Returns per-attribute rates, their mean (`leakage_mean`, each attribute
    weighted equally) and the pooled rate (`leakage_pooled`). 0 = never copied; chance for an
    attribute with k values and a classifier guessing uniformly is 1/k.
    """
    _check_lengths(predicted_attrs=predicted_attrs, reference_attrs=reference_attrs, prompt_attrs=prompt_attrs)
    eligible: dict[str, int] = {}
    leaked: dict[str, int] = {}
    for predicted, reference, prompt in zip(predicted_attrs, reference_attrs, prompt_attrs):
        for name, asked in prompt.items():
            if name in reference and reference[name] != asked:
                eligible[name] = eligible.get(name, 0) + 1
                leaked[name] = leaked.get(name, 0) + int(predicted.get(name) == reference[name])
    if not eligible:
        raise ValueError("no image's prompt asked for a look value different from its reference's: leakage is undefined")
    per_attribute = {name: leaked[name] / eligible[name] for name in sorted(eligible)}
    return {"leakage_mean": float(np.mean(list(per_attribute.values()))),
            "leakage_pooled": sum(leaked.values()) / sum(eligible.values()),
            "per_attribute": per_attribute, "n_per_attribute": dict(sorted(eligible.items()))}  # fmt: skip


def prompt_adherence(predicted_attrs: Sequence[Mapping[str, str]], prompt_attrs: Sequence[Mapping[str, str]]) -> dict:
    """Prompt adherence per look attribute (a ground-truth counterpart of CLIP-T): the share of images whose
    predicted value equals the value the prompt named (a missing prediction counts as a miss)."""
    _check_lengths(predicted_attrs=predicted_attrs, prompt_attrs=prompt_attrs)
    asked: dict[str, int] = {}
    hit: dict[str, int] = {}
    for predicted, prompt in zip(predicted_attrs, prompt_attrs):
        for name, value in prompt.items():
            asked[name] = asked.get(name, 0) + 1
            hit[name] = hit.get(name, 0) + int(predicted.get(name) == value)
    if not asked:
        raise ValueError("no prompt names a look attribute: adherence is undefined")
    per_attribute = {name: hit[name] / asked[name] for name in sorted(asked)}
    return {"adherence_mean": float(np.mean(list(per_attribute.values()))),
            "adherence_pooled": sum(hit.values()) / sum(asked.values()),
            "per_attribute": per_attribute, "n_per_attribute": dict(sorted(asked.items()))}  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Summaries


def summarize(values, *, seed_axis: int | None = None) -> dict:
    """Mean, sample std (ddof=1; 0 for one value) and n over all values; with `seed_axis`, also the spread
    over seeds: the mean per seed (over every other axis), and the std, min and max of those means."""
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    values = np.asarray(values, dtype=np.float64)
    if values.size == 0 or not np.all(np.isfinite(values)):
        raise ValueError(f"summarize needs finite values, got {values.size} value(s) with "
                         f"{int((~np.isfinite(values)).sum())} non-finite")  # fmt: skip
    flat = values.ravel()
    out = {"mean": float(flat.mean()), "std": float(flat.std(ddof=1)) if flat.size > 1 else 0.0, "n": int(flat.size)}
    if seed_axis is not None:
        per_seed = np.moveaxis(values, seed_axis, 0).reshape(values.shape[seed_axis], -1).mean(1)
        out.update(n_seeds=len(per_seed), seed_means=per_seed.tolist(),
                   seed_std=float(per_seed.std(ddof=1)) if len(per_seed) > 1 else 0.0,
                   seed_min=float(per_seed.min()), seed_max=float(per_seed.max()))  # fmt: skip
    return out
