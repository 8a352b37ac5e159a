"""A small supervised CNN that reads every look attribute of a 64 px render.

Two uses: `diagnostics.attribute_ceiling` trains it to measure what the pixels allow, and the toy
CLIP distils its features into the vision tower (`CLIPTrainConfig.distill_weight`), giving the ViT the
local, shift-tolerant features that a CNN learns in minutes and a small ViT does not learn in its
budget from captions and labels alone (DeiT, Touvron et al. 2021, distils a CNN into a ViT for the same
reason; here the targets are the CNN's feature maps, FitNets-style, Romero et al. 2015).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from .identity import BROW_COLOURS, IRIS_COLOURS, LOOK_ATTRIBUTES, SKIN_TONES, IdentityParams, identity_params

# Identity traits an identity network learns to read (`identity_trait_labels`): the categorical ones with their
# values, the marks as counts, and every continuous trait of `IdentityParams` cut into quantile bins.
TRAIT_CATEGORIES = {"skin_tone": list(SKIN_TONES), "iris_colour": list(IRIS_COLOURS), "brow_colour": list(BROW_COLOURS)}
CONTINUOUS_TRAITS = tuple(f.name for f in dataclasses.fields(IdentityParams) if f.type == "float")


def attribute_labels(arrays: dict) -> torch.Tensor:
    """[N, attributes] class indices, -100 where the attribute is not visible (bald hair colour, ...)."""
    return torch.tensor([[values.index(a[name]) if a[name] else -100 for name, values in LOOK_ATTRIBUTES.items()]
                         for a in arrays["attributes"]])  # fmt: skip


def identity_trait_labels(identities, *, bins: int = 4, edges: dict[str, np.ndarray] | None = None
                          ) -> tuple[torch.Tensor, dict[str, int], dict[str, np.ndarray]]:  # fmt: skip
    """Class labels [N, traits] of every identity's traits, the number of classes per trait (an `AttributeCNN`'s
    `classes`) and the bin edges of the continuous traits: quantiles over `identities` unless `edges` are given
    (pass the training identities' edges to label held-out ones alike). Marks are counted: moles (0-3),
    freckles and scar (0/1). Unlike an identity index, traits are shared between people, so a network that
    reads them reads unseen people too."""
    people = [identity_params(int(i)) for i in identities]
    columns = {name: [values.index(getattr(p, name)) for p in people] for name, values in TRAIT_CATEGORIES.items()}
    columns |= {"moles": [min(len(p.moles), 3) for p in people], "freckles": [int(bool(p.freckles)) for p in people],
                "scar": [int(p.scar is not None) for p in people]}  # fmt: skip
    classes = {name: len(values) for name, values in TRAIT_CATEGORIES.items()} | {"moles": 4, "freckles": 2, "scar": 2}
    if edges is None:
        edges = {name: np.quantile([getattr(p, name) for p in people], np.linspace(0, 1, bins + 1)[1:-1])
                 for name in CONTINUOUS_TRAITS}  # fmt: skip
    for name in CONTINUOUS_TRAITS:
        columns[name] = np.searchsorted(edges[name], [getattr(p, name) for p in people]).tolist()
        classes[name] = len(edges[name]) + 1
    return torch.tensor(list(zip(*columns.values()))), classes, edges


def attribute_accuracy(logits: list[torch.Tensor], labels: torch.Tensor, names=LOOK_ATTRIBUTES
                       ) -> dict[str, float]:  # fmt: skip
    """Per-attribute accuracy of one logits tensor per attribute (`names`, in head order; default: the look
    attributes), over the images where it is visible (label >= 0)."""
    out = {}
    for j, name in enumerate(names):
        seen = labels[:, j] >= 0
        out[name] = float((logits[j][seen].argmax(-1) == labels[seen, j]).float().mean())
    return out


def look_classes() -> dict[str, int]:
    """The number of values of every look attribute: the default heads of an `AttributeCNN`."""
    return {name: len(values) for name, values in LOOK_ATTRIBUTES.items()}


class AttributeCNN(nn.Module):
    """Conv blocks (2 convs, BatchNorm, ReLU, 2x max-pool each), global average pool, one linear head per
    classified attribute: by default every look attribute (`classes`: name -> number of classes; the toy
    VAE's identity network has one head per identity trait, `identity_trait_labels`). Input: images in
    [-1, 1] (`data.to_tensor`)."""

    def __init__(self, *, widths: tuple[int, ...] = (32, 64, 96, 128), classes: dict[str, int] | None = None):
        super().__init__()
        blocks, width = [], 3
        for out in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)))  # fmt: skip
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(nn.Linear(width, n) for n in (classes or look_classes()).values())

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The output of every block: [N, width_i, H / 2^(i+1), W / 2^(i+1)]."""
        maps, x = [], images
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(pooled features [N, width], one logits tensor per look attribute)."""
        pooled = self.features(images)[-1].mean((2, 3))
        return pooled, [head(pooled) for head in self.heads]


def fit_attribute_cnn(images: torch.Tensor, labels: torch.Tensor, *, widths: tuple[int, ...] = (32, 64, 96, 128),
                      steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                      classes: dict[str, int] | None = None, desc: str = "attribute CNN") -> AttributeCNN:
    """Train an `AttributeCNN` on images in [-1, 1] and labels [N, heads] (`attribute_labels` for the default
    look heads; -100 skips) with AdamW, a one-cycle schedule and random batches; returned in eval mode."""
    torch.manual_seed(seed)
    model = AttributeCNN(widths=tuple(widths), classes=classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in trange(steps, desc=desc, mininterval=5):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        _, logits = model(images[batch])
        loss = sum(F.cross_entropy(out, labels[batch, j], ignore_index=-100) for j, out in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def evaluate_attribute_cnn(model: AttributeCNN, images: torch.Tensor, labels: torch.Tensor,
                           names=LOOK_ATTRIBUTES) -> dict:  # fmt: skip
    """Per-attribute accuracy and its mean on held-out images (`names`: the model's heads, in order)."""
    _, logits = model(images)
    accuracy = attribute_accuracy(logits, labels, names)
    return {"accuracy": accuracy, "mean": float(np.mean(list(accuracy.values())))}


@torch.no_grad()
def distillation_targets(model: AttributeCNN, images: torch.Tensor, grid: int, batch: int = 256, *, sub: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The teacher's targets for a ViT with a `grid` x `grid` patch grid: (dense [N, grid * grid, C] from the
    first block whose map is no larger than the grid, average-pooled onto it; pooled [N, width]), each
    standardised per channel over `images` so that every channel weighs alike in an MSE.

    With `sub` > 1 each patch token's target also carries the first map no larger than `grid * sub`,
    pooled to that size, as its `sub` x `sub` cells inside the patch (C_fine * sub^2 more channels): detail
    finer than a patch, such as the mouth's shape, that the coarse map holds only as an average."""
    dense, pooled = [], []
    for i in range(0, len(images), batch):
        maps = model.features(images[i : i + batch])
        parts = [_on_grid(maps, grid, 1)] + ([_on_grid(maps, grid, sub)] if sub > 1 else [])
        dense.append(torch.cat(parts, dim=-1))
        pooled.append(maps[-1].mean((2, 3)))
    dense, pooled = torch.cat(dense), torch.cat(pooled)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return (x - flat.mean(0)) / flat.std(0).clamp_min(1e-6)  # a channel that never fires stays 0

    return standardise(dense), standardise(pooled)


def _on_grid(maps: list[torch.Tensor], grid: int, sub: int) -> torch.Tensor:
    """The first map no larger than `grid * sub`, pooled to it, as [n, grid * grid, sub * sub * C] in the
    ViT's row-major token order (each token's sub x sub cells row-major, channels last)."""
    size = grid * sub
    level = next((m for m in maps if m.shape[-1] <= size), maps[-1])
    level = F.adaptive_avg_pool2d(level, size) if level.shape[-1] != size else level
    n, c = level.shape[:2]
    cells = level.reshape(n, c, grid, sub, grid, sub).permute(0, 2, 4, 3, 5, 1)  # [n, row, col, sub_r, sub_c, C]
    return cells.reshape(n, grid * grid, sub * sub * c)
