"""A feature cache: identity embeddings and CLIP features of a training or evaluation set, computed once.

One safetensors file holds stacked tensors (`arcface` [N, D], `clip` [N, T, H], optionally
`clip_blurred`, and `valid` [N] for images whose face analysis failed) and, in its metadata, the
sha256 of every image's pixels in order plus a description of the encoders. Lookups go by image
hash, so a cache built once serves training and evaluation whatever order they read images in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm.auto import tqdm


def image_hash(image) -> str:
    """sha256 of an image's pixels and shape (a PIL image or an HxWxC uint8 array)."""
    array = np.ascontiguousarray(np.asarray(image))
    return hashlib.sha256(str(array.shape).encode() + array.tobytes()).hexdigest()


def build_feature_cache(
    images: Iterable,
    encode: Callable[[list], dict[str, torch.Tensor | None]],
    path: str | Path,
    *,
    batch_size: int = 64,
    description: dict | None = None,
    total: int | None = None,
    dtype: torch.dtype = torch.float16,
) -> Path:
    """Encode `images` in batches with `encode(batch) -> {name: tensor [B, ...] or None rows}` and save.

    `encode` returns a dict of stacked features; a key "valid" ([B] bool) marks images whose
    features could not be computed (their rows are zeros).
    """
    hashes, parts = [], {}
    batch = []

    def flush():
        features = encode(batch)
        for key, value in features.items():
            parts.setdefault(key, []).append(value.detach().cpu())
        batch.clear()

    for image in tqdm(images, total=total, desc="feature cache", mininterval=2):
        hashes.append(image_hash(image))
        batch.append(image)
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    if not hashes:
        raise ValueError("no images to cache")
    tensors = {k: torch.cat(v).to(dtype if v[0].is_floating_point() else v[0].dtype).contiguous() for k, v in parts.items()}
    for key, value in tensors.items():
        if value.shape[0] != len(hashes):
            raise ValueError(f"encode returned {value.shape[0]} rows of {key!r} for {len(hashes)} images")
    metadata = {"hashes": json.dumps(hashes), "description": json.dumps(description or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)
    return path


class FeatureCache:
    """A loaded cache: `cache[image]` or `cache.lookup(hashes)` gives the features of known images."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"feature cache {self.path} not found; build it with build_feature_cache")
        with safe_open(str(self.path), framework="pt") as f:
            metadata = f.metadata() or {}
            self.tensors = {k: f.get_tensor(k) for k in f.keys()}
        if "hashes" not in metadata:
            raise ValueError(f"{self.path}: not a feature cache (no image hashes in its metadata)")
        self.hashes = json.loads(metadata["hashes"])
        self.description = json.loads(metadata.get("description", "{}"))
        self.index = {h: i for i, h in enumerate(self.hashes)}

    def __len__(self) -> int:
        return len(self.hashes)

    def __contains__(self, image) -> bool:
        return image_hash(image) in self.index

    def lookup(self, hashes: list[str]) -> dict[str, torch.Tensor]:
        missing = [h for h in hashes if h not in self.index]
        if missing:
            raise KeyError(f"{len(missing)} images are not in {self.path} (first hash {missing[0][:12]}...)")
        rows = torch.tensor([self.index[h] for h in hashes])
        return {k: v[rows] for k, v in self.tensors.items()}

    def __getitem__(self, image) -> dict[str, torch.Tensor]:
        return {k: v[0] for k, v in self.lookup([image_hash(image)]).items()}
