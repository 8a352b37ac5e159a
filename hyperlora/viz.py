"""Figures: how coefficients become a LoRA, how the scales move the UNet, and the contact sheet of a generation."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import torch

from .hypernet import HyperLoRA
from .lora import LoRAWeights, functional_lora
from .targets import LAYER_KEYS


def plot_assembly(model: HyperLoRA, coefficients: torch.Tensor, *, module: int = 0, key: str = "to_q", num_basis: int = 4):
    """One layer of one sample: c_down, a few down bases, A; c_up, a few up bases, B; and dW = 0.5 B A."""
    layer = getattr(model.lora_modules[module], key)
    token = 8 * module + 2 * LAYER_KEYS.index(key)
    c_down, c_up = coefficients[0, token].detach(), coefficients[0, token + 1].detach()
    down, up = layer.assemble(c_down[None], c_up[None], "id")
    rows = [("down", c_down, layer.id_down_basis, down[0]), ("up", c_up, layer.id_up_basis, up[0])]
    fig, axes = plt.subplots(2, num_basis + 2, figsize=(2.2 * (num_basis + 2), 5))
    for row, (name, c, basis, result) in zip(axes, rows):
        row[0].bar(np.arange(len(c)), c.float().numpy(), color="tab:blue")
        row[0].set_title(f"c_{name} (|c| = {c.norm():.2f})")
        for k, ax in zip(c.abs().argsort(descending=True)[:num_basis].tolist(), row[1:-1]):
            ax.imshow(basis[k].detach().float().numpy(), cmap="RdBu_r", aspect="auto")
            ax.set_title(f"{name} basis k={k}\nc={c[k]:+.2f}")
        row[-1].imshow(result.detach().float().numpy(), cmap="RdBu_r", aspect="auto")
        row[-1].set_title("A = (Σ c_k D_k)ᵀ" if name == "down" else "B = (Σ c_k U_k)ᵀ")
        for ax in row[1:]:
            ax.set_xticks([])
            ax.set_yticks([])
    target = model.targets[module]
    fig.suptitle(f"{target.name}.{key}: coefficients -> LoRA matrices (ΔW = 0.5 · B·A)")
    fig.tight_layout()
    return fig


@torch.no_grad()
def scale_sweep(unet, loras: dict[str, LoRAWeights], inputs: dict, id_scales, base_scales) -> np.ndarray:
    """Relative change ||eps(s_id, s_base) - eps(0, 0)|| / ||eps(0, 0)|| of the UNet's prediction."""
    base = unet(**inputs).sample
    out = np.zeros((len(id_scales), len(base_scales)))
    for i, s_id in enumerate(id_scales):
        for j, s_base in enumerate(base_scales):
            with functional_lora(unet, [loras["id"], loras["base"]], [s_id, s_base]):
                out[i, j] = float((unet(**inputs).sample - base).norm() / base.norm())
    return out


def plot_scale_sweep(values: np.ndarray, id_scales, base_scales, title: str = "UNet output change"):
    fig, ax = plt.subplots(figsize=(1.2 * len(base_scales) + 2, 1.0 * len(id_scales) + 1.5))
    image = ax.imshow(values, cmap="viridis", origin="lower")
    ax.set_xticks(range(len(base_scales)), [f"{s:g}" for s in base_scales])
    ax.set_yticks(range(len(id_scales)), [f"{s:g}" for s in id_scales])
    ax.set_xlabel("Base-LoRA scale")
    ax.set_ylabel("ID-LoRA scale")
    for (i, j), v in np.ndenumerate(values):
        ax.text(j, i, f"{v:.3f}", ha="center", va="center", color="w" if v < values.max() / 2 else "k", fontsize=8)
    fig.colorbar(image, ax=ax, label="relative change")
    ax.set_title(title)
    fig.tight_layout()
    return fig


def contact_sheet(references: list, boxes: list, rows: list[list], *, row_labels: list[str] | None = None,
                  tile: int = 128, title: str = ""):  # fmt: skip
    """references (the chosen face boxed in green; None box: skipped, crossed out in red) | generations, a row each.

    references: PIL images; boxes: (x0, y0, x1, y1) in each reference's pixels, or None; rows: lists of PIL images.
    Returns one RGB PIL image.
    """
    from PIL import Image, ImageDraw

    gap, label_h = tile // 8, 14
    columns = max((len(r) for r in rows), default=0)
    height = label_h + max(len(references), len(rows), 1) * (tile + label_h)
    sheet = Image.new("RGB", (tile + gap + columns * tile, height), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((2, 1), title, fill="black")
    for i, (image, box) in enumerate(zip(references, boxes)):
        scale = tile / max(image.size)
        thumb = image.convert("RGB").resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))))
        top = label_h + i * (tile + label_h) + label_h
        sheet.paste(thumb, (0, top))
        if box is None:
            draw.line((0, top, thumb.width, top + thumb.height), fill="red", width=3)
            draw.line((0, top + thumb.height, thumb.width, top), fill="red", width=3)
            draw.text((2, top - label_h), f"ref {i}: skipped", fill="red")
            continue
        x0, y0, x1, y1 = (float(v) * scale for v in box)
        draw.rectangle((x0, top + y0, x1, top + y1), outline=(0, 200, 0), width=2)
        draw.text((2, top - label_h), f"ref {i}", fill="black")
    for r, row in enumerate(rows):
        top = label_h + r * (tile + label_h) + label_h
        if row_labels:
            draw.text((tile + gap, top - label_h), row_labels[r][: columns * tile // 6], fill="black")
        for c, image in enumerate(row):
            sheet.paste(image.convert("RGB").resize((tile, tile)), (tile + gap + c * tile, top))
    return sheet
