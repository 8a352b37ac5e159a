"""Sliders over generated LoRAs: ID and Base weights, identity interpolation, concept directions (notebook 08).

Each slider position is a weighted sum of LoRAs, `Terms` = [(LoRAWeights, weight), ...], which
`InPlaceFusion.fuse` and `functional_lora` apply as they are:
- ID and Base weights: [(id, w_id), (base, w_base)].
- identity interpolation from person A to person B in coefficient space (`interpolate_coefficients`): each of the
  resampler's output tokens is interpolated and rescaled to the model's norm, then assembled by the usual path
  (`HyperLoRA.assemble`); t = 0 and t = 1 give A's and B's coefficients exactly (their LoRAs up to float rounding).
- concept slider from an image pair (`concept_terms`): the LoRA difference between two photos of one person that
  differ in one attribute, added with a weight to a third person's LoRA; weight 0 is that LoRA unchanged.

Every slider has two front ends over one `render(**values) -> PIL image`: `slider_grid` renders a grid over
chosen values (papermill, CI, figures) and `slider_demo` an ipywidgets panel that re-renders on change.
"""

from __future__ import annotations

import io
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .hypernet import HyperLoRA
from .lora import LoRAWeights

Terms = list[tuple[LoRAWeights, float]]  # sum_i w_i * dW_i, as InPlaceFusion.fuse(loras, scales) takes it


# --- identity interpolation -------------------------------------------------------------------


def interpolate_coefficients(a: torch.Tensor, b: torch.Tensor, t: float, eps: float = 1e-12) -> torch.Tensor:
    """Per-token interpolation of two coefficient tensors [B, Q, K], renormalised to the model's norms.

    The resampler's outputs are unit vectors (`normalize_coefficients`), but the straight line between two of them
    runs inside the sphere (its norm drops to cos(angle / 2) midway), which would shrink the LoRA. So each token of
    (1 - t) a + t b is rescaled to (1 - t) |a| + t |b|, the norm the model produces (1 up to its eps). At t = 0 and
    t = 1 the result is a and b bit for bit (x * (n / n) = x exactly).
    """
    if a.shape != b.shape:
        raise ValueError(f"coefficient shapes differ: {tuple(a.shape)} and {tuple(b.shape)}")
    mixed = (1 - t) * a + t * b
    norm = (1 - t) * a.norm(dim=-1, keepdim=True) + t * b.norm(dim=-1, keepdim=True)
    return mixed * (norm / mixed.norm(dim=-1, keepdim=True).clamp_min(eps))


def interpolation_path(
    model: HyperLoRA, a: torch.Tensor, b: torch.Tensor, ts: Sequence[float], branch: str = "id"
) -> LoRAWeights:
    """LoRAs along the path from coefficients a [1, Q, K] to b [1, Q, K]: one batch entry per t (`.select(i)`)."""
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise ValueError(f"one person each: coefficients [1, Q, K], got {tuple(a.shape)} and {tuple(b.shape)}")
    path = torch.cat([interpolate_coefficients(a, b, float(t)) for t in ts])  # [len(ts), Q, K]
    return model.assemble(path, branch)


# --- concept slider ---------------------------------------------------------------------------


def concept_terms(lora: LoRAWeights, positive: LoRAWeights, negative: LoRAWeights, weight: float,
                  scale: float = 1.0) -> Terms:  # fmt: skip
    """scale * (dW + weight * (dW_positive - dW_negative)): a concept direction added to a person's LoRA.

    positive and negative are one person's LoRAs from two photos differing in one attribute (smiling and
    neutral, say). The difference is taken between LoRAs, not coefficients: a LoRA is bilinear in its down and up
    coefficients, so a difference of coefficients is not a difference of updates. Weight 0 fuses `lora` alone
    (the two extra terms add exact zeros).
    """
    return [(lora, scale), (positive, weight * scale), (negative, -weight * scale)]


# --- rendering --------------------------------------------------------------------------------


@torch.no_grad()
def fused_image(pipe, terms: Terms, prompt: str, seed: int, **kwargs):
    """One image from a HyperLoRAPipeline with `terms` fused into its UNet, at a fixed seed (a CPU generator).

    The pipeline's current personalisation is dropped first (`pipe.reset()`), and the base weights are restored
    after the image: each slider position starts from the base model, so positions never accumulate.
    kwargs override the world's sampling defaults (steps, guidance, size).
    """
    pipe.reset()
    pipe.fusion.fuse([lora for lora, _ in terms], [float(w) for _, w in terms])
    try:
        generator = torch.Generator().manual_seed(seed)
        return pipe.pipe(pipe.prompt_as_sent(prompt), generator=generator, **{**pipe.defaults, **kwargs}).images[0]
    finally:
        pipe.fusion.restore()


# --- the two front ends: a grid (non-interactive twin) and ipywidgets ---------------------------


@dataclass
class SliderGrid:
    """Images rendered over every combination of slider values: rows over the first slider, columns the second."""

    names: list[str]  # slider names, one or two
    values: list[list[float]]  # the values of each slider
    images: list[list]  # [rows][columns] PIL images

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.images), len(self.images[0])

    def figure(self, title: str = "", tile: float = 1.6):
        """A matplotlib figure of the grid, labelled with the slider values."""
        import matplotlib.pyplot as plt

        rows, columns = self.shape
        fig, axes = plt.subplots(rows, columns, figsize=(tile * columns + 0.6, tile * rows + 0.6), squeeze=False)
        for r, c in itertools.product(range(rows), range(columns)):
            ax = axes[r, c]
            ax.imshow(self.images[r][c])
            ax.set_xticks([])
            ax.set_yticks([])
            if r == rows - 1:
                ax.set_xlabel(f"{self.names[-1]} = {self.values[-1][c]:g}", fontsize=8)
            if c == 0 and len(self.names) == 2:
                ax.set_ylabel(f"{self.names[0]} = {self.values[0][r]:g}", fontsize=8)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return fig


def slider_grid(render: Callable[..., object], **values: Sequence[float]) -> SliderGrid:
    """`render(**point)` at every combination of one or two sliders' values (the widgets' non-interactive twin)."""
    if not 1 <= len(values) <= 2:
        raise ValueError(f"a grid spans one or two sliders, got {sorted(values)}")
    names = list(values)
    lists = [[float(v) for v in values[n]] for n in names]
    if any(not v for v in lists):
        raise ValueError(f"every slider needs at least one value: {dict(zip(names, lists))}")
    if len(names) == 1:
        images = [[render(**{names[0]: v}) for v in lists[0]]]
    else:
        images = [[render(**{names[0]: r, names[1]: c}) for c in lists[1]] for r in lists[0]]
    return SliderGrid(names, lists, images)


def _png(image, size: int) -> bytes:
    buffer = io.BytesIO()
    image.convert("RGB").resize((size, size)).save(buffer, format="PNG")
    return buffer.getvalue()


def slider_demo(render: Callable[..., object], *, size: int = 256, **sliders: tuple[float, float, float, float]):
    """An ipywidgets panel: one slider per keyword, (min, max, step, start), and the image re-rendered on release.

    Display the returned widget in JupyterLab; `slider_grid` renders the same `render` over fixed values.
    """
    import ipywidgets as widgets

    controls = {
        name: widgets.FloatSlider(
            min=lo,
            max=hi,
            step=step,
            value=start,
            description=name,
            continuous_update=False,
            style={"description_width": "initial"},  # the whole name ("base_weight"), not "base_wei..."
        )
        for name, (lo, hi, step, start) in sliders.items()
    }
    image = widgets.Image(format="png", width=size, height=size)

    def update(_change=None) -> None:
        image.value = _png(render(**{name: control.value for name, control in controls.items()}), size)

    for control in controls.values():
        control.observe(update, names="value")
    update()
    return widgets.VBox([*controls.values(), image])
