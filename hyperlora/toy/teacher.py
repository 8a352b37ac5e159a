"""A small supervised CNN that reads every look attribute of a 64 px render.

Two uses: `diagnostics.attribute_ceiling` trains it to measure what the pixels allow, and the toy
CLIP distils its features into the vision tower (`CLIPTrainConfig.distill_weight`), giving the ViT the
local, shift-tolerant features that a CNN learns in minutes and a small ViT does not learn in its
budget from captions and labels alone (DeiT, Touvron et al. 2021, distils a CNN into a ViT for the same
reason; here the targets are the CNN's feature maps, FitNets-style, Romero et al. 2015).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import trange

from .identity import LOOK_ATTRIBUTES


def attribute_labels(arrays: dict) -> torch.Tensor:
    """[N, attributes] class indices, -100 where the attribute is not visible (bald hair colour, ...)."""
    return torch.tensor([[values.index(a[name]) if a[name] else -100 for name, values in LOOK_ATTRIBUTES.items()]
                         for a in arrays["attributes"]])  # fmt: skip


def attribute_accuracy(logits: list[torch.Tensor], labels: torch.Tensor) -> dict[str, float]:
    """Per-attribute accuracy of one logits tensor per attribute, over the images where it is visible."""
    out = {}
    for j, name in enumerate(LOOK_ATTRIBUTES):
        seen = labels[:, j] >= 0
        out[name] = float((logits[j][seen].argmax(-1) == labels[seen, j]).float().mean())
    return out


class AttributeCNN(nn.Module):
    """Conv blocks (2 convs, BatchNorm, ReLU, 2x max-pool each), global average pool, one linear head per
    look attribute. Input: images in [-1, 1] (`data.to_tensor`)."""

    def __init__(self, *, widths: tuple[int, ...] = (32, 64, 96, 128)):
        super().__init__()
        blocks, width = [], 3
        for out in widths:
            blocks.append(nn.Sequential(
                nn.Conv2d(width, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(),
                nn.Conv2d(out, out, 3, padding=1), nn.BatchNorm2d(out), nn.ReLU(), nn.MaxPool2d(2)))  # fmt: skip
            width = out
        self.blocks = nn.ModuleList(blocks)
        self.heads = nn.ModuleList(nn.Linear(width, len(values)) for values in LOOK_ATTRIBUTES.values())

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
                      steps: int = 1500, batch_size: int = 64, lr: float = 2e-3, seed: int = 0
                      ) -> AttributeCNN:  # fmt: skip
    """Train an `AttributeCNN` on images in [-1, 1] and `attribute_labels` (AdamW, one-cycle schedule,
    random batches); returned in eval mode."""
    torch.manual_seed(seed)
    model = AttributeCNN(widths=tuple(widths))
    optimizer = torch.optim.AdamW(model.parameters(), lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in trange(steps, desc="attribute CNN", mininterval=5):
        batch = torch.randint(0, len(images), (batch_size,), generator=generator)
        _, logits = model(images[batch])
        loss = sum(F.cross_entropy(out, labels[batch, j], ignore_index=-100) for j, out in enumerate(logits))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    return model.eval()


@torch.no_grad()
def evaluate_attribute_cnn(model: AttributeCNN, images: torch.Tensor, labels: torch.Tensor) -> dict:
    """Per-attribute accuracy and its mean on held-out images."""
    _, logits = model(images)
    accuracy = attribute_accuracy(logits, labels)
    return {"accuracy": accuracy, "mean": float(np.mean(list(accuracy.values())))}


@torch.no_grad()
def distillation_targets(model: AttributeCNN, images: torch.Tensor, grid: int, batch: int = 256
                         ) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """The teacher's targets for a ViT with a `grid` x `grid` patch grid: (dense [N, grid * grid, C] from the
    first block whose map is no larger than the grid, average-pooled onto it; pooled [N, width]), each
    standardised per channel over `images` so that every channel weighs alike in an MSE."""
    dense, pooled = [], []
    for i in range(0, len(images), batch):
        maps = model.features(images[i : i + batch])
        level = next((m for m in maps if m.shape[-1] <= grid), maps[-1])
        level = F.adaptive_avg_pool2d(level, grid) if level.shape[-1] != grid else level
        dense.append(level.flatten(2).transpose(1, 2))  # [n, C, grid, grid] -> [n, grid * grid, C]
        pooled.append(maps[-1].mean((2, 3)))
    dense, pooled = torch.cat(dense), torch.cat(pooled)

    def standardise(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return (x - flat.mean(0)) / flat.std(0).clamp_min(1e-6)  # a channel that never fires stays 0

    return standardise(dense), standardise(pooled)
