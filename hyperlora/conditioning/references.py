"""Reference photos -> the hypernetwork's inputs, one photo at a time, failures reported per photo.

For each photo (release §2.3-2.4): load it robustly, choose the face, cut the masked CLIP crop,
embed the 3x ArcFace crop, and for the Base branch blur the face out. Unlike the release, which
skips failed images with a print, every failure is returned with its reason, and at least one
photo must succeed. The coefficients of several photos are averaged inside the resampler.

Skipped photos and per-photo warnings (several faces, a small, dark or low-contrast face, a
grayscale photo) are raised as `ReferencePhotoWarning`s, so a user sees them, and kept in
`ReferenceFeatures` for a run's record.
"""

from __future__ import annotations

import warnings as python_warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image

from .cache import image_hash
from .clip_features import ClipImageEncoder
from .crops import base_image
from .faces import DEFAULT_MIN_FACE_SIZE, FaceAnalyzer, Pick, id_condition
from .images import ConditioningError, ImageSource, describe, load_image


class NoUsableReferenceError(ConditioningError, ValueError):
    """Every reference photo failed; the message lists each photo and why."""


class PreparedPhoto(NamedTuple):
    """One photo's conditioning (`Conditioner.prepare`)."""

    crop: Image.Image  # the masked CLIP crop (ID branch)
    embedding: np.ndarray  # the identity embedding
    base: Image.Image | None  # the face-blurred image (Base branch), None without one
    warnings: list[str]
    digest: str  # the pixels' hash
    box: tuple[float, float, float, float]  # the chosen face's box x1, y1, x2, y2 in the photo's pixels


class ReferencePhotoWarning(UserWarning):
    """A reference photo was skipped, or is usable but may cost likeness (several faces, small, grayscale, ...)."""


@dataclass
class ReferenceFeatures:
    """What `HyperLoRA.generate` takes for one identity, from the photos that succeeded."""

    arcface: torch.Tensor  # [N, id_embed_dim] L2-normalised identity embeddings
    clip: torch.Tensor  # [N, tokens, hidden] CLIP hidden_states[-2] of the masked face crops
    clip_blurred: torch.Tensor | None  # [N, tokens, hidden] of the face-blurred images (Base branch)
    sources: list[str]  # the photos used, in order
    hashes: list[str]  # sha256 of each used photo's pixels (see cache.image_hash)
    failures: dict[str, str] = field(default_factory=dict)  # photo -> reason it was skipped (without the name)
    warnings: list[str] = field(default_factory=list)  # per-photo warnings, each starting with the photo's name

    @property
    def num_refs(self) -> int:
        return len(self.sources)

    def generate_kwargs(self) -> dict:
        """Keyword arguments for `HyperLoRA.generate`."""
        return {"arcface": self.arcface, "clip": self.clip, "clip_blurred": self.clip_blurred, "num_refs": self.num_refs}


def _name(source: ImageSource, index: int) -> str:
    if isinstance(source, (str, Path)):
        return str(source)
    return f"image {index} ({describe(source)})"


def _reason(error: Exception, *names: str) -> str:
    """An error's message without the leading 'name: ' that every conditioning error starts with."""
    text = str(error)
    for name in names:
        if text.startswith(f"{name}: "):
            return text[len(name) + 2 :]
    return text


class Conditioner:
    """Face analysis + CLIP: photos -> `ReferenceFeatures`, in either world."""

    def __init__(
        self,
        analyzer: FaceAnalyzer,
        clip: ClipImageEncoder,
        *,
        with_base: bool = False,
        pick: Pick = "largest",
        min_face_size: float = DEFAULT_MIN_FACE_SIZE,
        grayscale: bool = False,
        remove_background: bool = True,
    ):
        self.analyzer, self.clip, self.with_base = analyzer, clip, with_base
        self.options = {"pick": pick, "min_face_size": min_face_size, "grayscale": grayscale,
                        "remove_background": remove_background}  # fmt: skip

    def prepare(self, source: ImageSource, name: str) -> PreparedPhoto:
        """One photo -> its CLIP crop, identity embedding, Base image or None, warnings, pixel hash and face box."""
        image = load_image(source)
        condition = id_condition(self.analyzer, image, name=name, **self.options)
        base = base_image(image, condition.face) if self.with_base else None
        box = tuple(float(v) for v in np.asarray(condition.face.bbox, dtype=np.float64)[:4])
        return PreparedPhoto(condition.clip_image, condition.embedding, base, condition.warnings, image_hash(image), box)

    def __call__(self, sources: list[ImageSource] | ImageSource) -> ReferenceFeatures:
        """Every usable photo's features; skipped photos and warnings are also raised as ReferencePhotoWarning."""
        if not isinstance(sources, (list, tuple)):
            sources = [sources]
        if not sources:
            raise NoUsableReferenceError("no reference photos given")
        crops, embeddings, bases, used, hashes, failures, warnings = [], [], [], [], [], {}, []
        for index, source in enumerate(sources):
            name = _name(source, index)
            try:
                crop, embedding, base, notes, digest, _ = self.prepare(source, name)
            except ConditioningError as err:
                failures[name] = _reason(err, name, describe(source))
                continue
            crops.append(crop)
            embeddings.append(embedding)
            bases.append(base)
            used.append(name)
            hashes.append(digest)
            warnings.extend(notes)
        if not used:
            reasons = "\n".join(f"  {name}: {reason}" for name, reason in failures.items())
            raise NoUsableReferenceError(f"none of the {len(sources)} reference photos could be used:\n{reasons}")
        for message in [f"skipping reference {name}: {reason}" for name, reason in failures.items()] + warnings:
            python_warnings.warn(message, ReferencePhotoWarning, stacklevel=2)
        return ReferenceFeatures(
            arcface=torch.from_numpy(np.stack(embeddings)).float(),
            clip=self.clip(crops),
            clip_blurred=self.clip(bases) if self.with_base else None,
            sources=used,
            hashes=hashes,
            failures=failures,
            warnings=warnings,
        )
