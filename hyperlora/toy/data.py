"""Toy portraits as torch data: a map-style Dataset over the renderer, and an in-memory array form.

Item i of `ToyPortraits(identities, n_per_identity, seed)` is `render_sample(identities[i // n],
i % n, seed)`: deterministic, so every trainer and evaluation sees the same images for the same
arguments, and any item can be rebuilt on its own.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from .render import LOOK_ATTRIBUTES, Render, render_sample, split_identities, visible_attributes


def attributes_of(render: Render) -> dict[str, str]:
    """Every look attribute, "" where it is not visible (hair colour when bald, glasses colour without glasses)."""
    visible = visible_attributes(render.look)
    return {key: visible.get(key, "") for key in LOOK_ATTRIBUTES}


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 [..., H, W, 3] -> float [..., 3, H, W] in [-1, 1] (the VAE's and UNet's convention)."""
    return torch.from_numpy(np.ascontiguousarray(images)).movedim(-1, -3).float().div(127.5).sub(1.0)


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """float [..., 3, H, W] in [-1, 1] -> uint8 [..., H, W, 3]."""
    array = images.detach().float().clamp(-1, 1).add(1).mul(127.5).round().to(torch.uint8)
    return array.movedim(-3, -1).cpu().numpy()


class ToyPortraits(Dataset):
    """Rendered portraits with their ground truth; `identities` is a range from `split_identities`."""

    def __init__(self, identities: Sequence[int], n_per_identity: int, seed: int, size: int = 64,
                 identity_prob: float = 0.3):
        if n_per_identity < 1 or len(identities) < 1:
            raise ValueError("ToyPortraits needs at least one identity and one image per identity")
        self.identities = identities
        self.n_per_identity = n_per_identity
        self.seed = seed
        self.size = size
        self.identity_prob = identity_prob

    def __len__(self) -> int:
        return len(self.identities) * self.n_per_identity

    def render(self, index: int) -> Render:
        identity = self.identities[index // self.n_per_identity]
        return render_sample(identity, index % self.n_per_identity, self.seed, self.size, self.identity_prob)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(index)
        r = self.render(index)
        return {
            "pixel_values": to_tensor(r.image),
            "caption": r.caption,
            "identity": r.identity,
            "box": torch.tensor(r.box, dtype=torch.float32),
            "keypoints": torch.from_numpy(r.keypoints),
            "mask": torch.from_numpy(r.mask),
            "attributes": attributes_of(r),
        }


def render_arrays(dataset: ToyPortraits, progress: bool = True) -> dict:
    """Render a whole dataset into memory: images uint8 [N, H, W, 3] plus per-image ground truth
    (boxes, keypoints, face masks bool [N, H, W], identities, captions, attributes)."""
    n = len(dataset)
    images = np.empty((n, dataset.size, dataset.size, 3), dtype=np.uint8)
    boxes = np.empty((n, 4), dtype=np.float32)
    keypoints = np.empty((n, 5, 2), dtype=np.float32)
    masks = np.empty((n, dataset.size, dataset.size), dtype=bool)
    identities = np.empty(n, dtype=np.int64)
    captions, attributes = [], []
    for i in tqdm(range(n), desc="rendering", disable=not progress, mininterval=2):
        r = dataset.render(i)
        images[i], boxes[i], keypoints[i], identities[i] = r.image, r.box, r.keypoints, r.identity
        masks[i] = r.mask
        captions.append(r.caption)
        attributes.append(attributes_of(r))
    return {"images": images, "boxes": boxes, "keypoints": keypoints, "masks": masks, "identities": identities,
            "captions": captions, "attributes": attributes}  # fmt: skip


def split_renders(split: str, num_identities: int | None, n_per_identity: int, seed: int, size: int = 64) -> dict:
    """`render_arrays` of the first `num_identities` identities of a split (None: all of them)."""
    identities = split_identities(split)
    identities = identities[:num_identities] if num_identities else identities
    return render_arrays(ToyPortraits(identities, n_per_identity, seed, size=size), progress=False)
