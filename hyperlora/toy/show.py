"""Figures and tables for notebooks/01_toy_world.ipynb: renders with their ground truth, the model cards, the demos.

The notebook stays a thin client: it computes with the toy modules (render, clip, faces, vae,
pipeline) and hands arrays to these functions, which only lay them out. A model folder that is not
there is reported by `model_present`, with the command that builds it, so a section can be skipped.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.patches import Rectangle

from .cards import CARD_JSON, read_model_card
from .faces import box_iou, plot_cosines  # noqa: F401  (the notebook's cosine histogram)
from .render import Render

# folder -> (what it is, the file that says the model is there, key figures of its card as dotted paths)
MODELS = {
    "clip": ("CLIP (image + text towers)", "config.json", ("zero_shot_mean", "i2t_r1", "t2i_r1")),
    "faces": ("face detector + ArcFace recogniser", "recognizer.onnx",
              ("detection.detection_rate", "detection.kps_error_px", "verification.verification_accuracy",
               "verification.tar_at_far")),
    "vae": ("VAE (AutoencoderKL, f = 4)", "config.json", ("psnr", "psnr_min", "identity_cosine")),
    "sdxl": ("base model (StableDiffusionXLPipeline)", "model_index.json",
             ("attribute_accuracy", "judge_accuracy_on_renders_mean", "judge_accuracy_through_vae_mean", "face_rate",
              "identity_similarity")),
}  # fmt: skip
BUILD_ONLY = {"clip": "clip", "faces": "faces", "vae": "vae", "sdxl": "unet"}  # `--only unet` also assembles sdxl/
KEYPOINT_NAMES = ("left eye", "right eye", "nose tip", "left mouth", "right mouth")


def build_command(name: str, toy_dir: str | Path | None = None) -> str:
    """The command line that builds model folder `name` (into `toy_dir` when it is not the default)."""
    from .pipeline import DEFAULT_TOY_DIR

    command = f"python -m hyperlora.toy build --only {BUILD_ONLY[name]}"
    if toy_dir is not None and Path(toy_dir).resolve() != DEFAULT_TOY_DIR.resolve():
        command += f" --out {toy_dir}"
    return command + ("   # trains the UNet (needs clip/ and vae/), then assembles sdxl/" if name == "sdxl" else "")


def model_present(toy_dir: str | Path, name: str) -> bool:
    """True when `toy_dir/name` holds its model; otherwise print which folder is missing and how to build it."""
    folder = Path(toy_dir) / name
    marker = MODELS[name][1]
    if (folder / marker).is_file():
        return True
    state = "is missing" if not folder.is_dir() else f"has no {marker}"
    print(f"SKIPPED: {folder} {state}. Build it with\n    {build_command(name, toy_dir)}")
    return False


# ---------------------------------------------------------------------------------------------
# Model cards


def _lookup(figures: dict, dotted: str):
    for key in dotted.split("."):
        figures = figures.get(key) if isinstance(figures, dict) else None
    return figures


def card_rows(toy_dir: str | Path) -> list[dict]:
    """One row per model folder, straight from its model_card.json: size, training time, key figures, gates."""
    rows = []
    for name, (what, _, keys) in MODELS.items():
        folder = Path(toy_dir) / name
        if not (folder / CARD_JSON).is_file():
            rows.append({"model": name, "what": what, "present": folder.is_dir(), "card": False})
            continue
        card = read_model_card(folder)
        gates = card.get("gates") or {}
        rows.append({
            "model": name, "what": what, "present": True, "card": True, "weights_mb": card["weights_mb"],
            "train_minutes": card["train_seconds"] / 60, "created_utc": card.get("created_utc"),
            "figures": {key.split(".")[-1]: _lookup(card["figures"], key) for key in keys},
            "gates_passed": sum(map(bool, gates.values())), "gates": len(gates),
            "failed": [gate for gate, ok in gates.items() if not ok],
        })  # fmt: skip
    return rows


def format_cards(rows: list[dict]) -> str:
    """The card rows as a fixed-width text table (failed gates listed under their model)."""
    cell = lambda v: "n/a" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v)  # noqa: E731
    lines = [f"{'model':<6} {'weights':>9} {'training':>9} {'gates':>7}  key figures", "-" * 100]
    for row in rows:
        if not row["card"]:
            lines.append(f"{row['model']:<6} {'missing' if not row['present'] else 'no model card'}")
            continue
        figures = ", ".join(f"{key} {cell(value)}" for key, value in row["figures"].items())
        gates = f"{row['gates_passed']}/{row['gates']}" if row["gates"] else "none"
        lines.append(f"{row['model']:<6} {row['weights_mb']:>6.1f} MB {row['train_minutes']:>5.1f} min {gates:>7}  "
                     f"{figures}")  # fmt: skip
        lines += [f"{'':<6} FAILED gate: {gate}" for gate in row["failed"]]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Figures


def _wrap(text: str, width: int) -> str:
    """Wrap each line of `text` to `width` characters (existing line breaks are kept)."""
    return "\n".join(part for line in text.split("\n") for part in (textwrap.wrap(line, width) or [""]))


def prediction_captions(predicted: list[dict], truth: list[dict]) -> list[str]:
    """One caption per image: each predicted attribute, and the true value where the prediction is wrong."""
    return ["\n".join(f"{name}: {p[name]}" + ("" if p[name] == value else f"  (is {value})")
                      for name, value in t.items() if name in p)
            for p, t in zip(predicted, truth)]  # fmt: skip


def plot_grid(images, *, titles=None, row_labels=None, captions=None, wrap: int = 30, cell: float = 2.0,
              fontsize: float = 6):  # fmt: skip
    """Images [rows][cols] (uint8 H x W x 3) in a grid; column titles above, row labels at the left and
    one caption under each image, all wrapped to `wrap` characters."""
    rows, cols = len(images), len(images[0])
    captions = [[_wrap(c, wrap) for c in row] for row in captions] if captions else None
    titles = [_wrap(t, wrap) for t in titles] if titles else None
    line = fontsize * 1.45 / 72  # inches per text line, with matplotlib's line spacing
    under = max((c.count("\n") + 1 for row in captions for c in row), default=0) * line if captions else 0
    above = max(t.count("\n") + 1 for t in titles) * line if titles else 0
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, rows * (cell + under) + above + 0.2), squeeze=False)
    for i in range(rows):
        for j in range(cols):
            ax = axes[i, j]
            ax.imshow(images[i][j])
            ax.set_xticks([])
            ax.set_yticks([])
            if captions:
                ax.set_xlabel(captions[i][j], fontsize=fontsize)
            if titles and i == 0:
                ax.set_title(titles[j], fontsize=fontsize)
            if row_labels and j == 0:
                ax.set_ylabel(row_labels[i], fontsize=fontsize + 1)
    fig.tight_layout(pad=0.3)
    return fig


def plot_ground_truth(r: Render):
    """One render with its ground truth: face box, the 5 keypoints (insightface order) and the face mask's outline."""
    fig, ax = plt.subplots(figsize=(5, 5.4))
    ax.imshow(r.image)
    x1, y1, x2, y2 = r.box
    ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="lime", linewidth=1.5))
    ax.contour(r.mask.astype(float), levels=[0.5], colors="yellow", linewidths=1.0)
    ax.scatter(*r.keypoints.T, c="red", s=16, zorder=3)
    for name, (x, y) in zip(KEYPOINT_NAMES, r.keypoints):
        ax.annotate(name, (x, y), xytext=(3, 3), textcoords="offset points", fontsize=6, color="white")
    handles = [Line2D([], [], color="lime", label="face box (forehead to chin)"),
               Line2D([], [], color="yellow", label="face mask outline"),
               Line2D([], [], color="red", marker="o", linestyle="", label="5 keypoints")]  # fmt: skip
    ax.legend(handles=handles, fontsize=7, loc="lower left")
    ax.set_title(_wrap(r.caption, 70), fontsize=7)
    ax.axis("off")
    fig.tight_layout()
    return fig


def plot_detections(renders: list[Render], detections: list):
    """Detector output (green box, red keypoints) over the true box and keypoints (white), with score,
    IoU and mean keypoint error in pixels."""
    fig, axes = plt.subplots(1, len(renders), figsize=(2.2 * len(renders), 2.6), squeeze=False)
    for ax, r, d in zip(axes[0], renders, detections):
        ax.imshow(r.image)
        for (x1, y1, x2, y2), style in ((r.box, dict(color="white", linestyle="--")), (d.box, dict(color="lime"))):
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linewidth=1.2, **style))
        ax.scatter(*r.keypoints.T, c="white", s=10, marker="x")
        ax.scatter(*d.kps.T, c="red", s=8)
        error = np.linalg.norm(d.kps - r.keypoints, axis=1).mean()
        iou = box_iou(np.asarray(d.box), np.asarray(r.box))
        ax.set_title(f"score {d.score:.2f}  IoU {iou:.2f}\nkeypoints off {error:.1f} px", fontsize=7)
        ax.axis("off")
    fig.tight_layout()
    return fig


def plot_attribute_accuracy(accuracy: dict[str, float], *, chance: dict[str, float] | None = None,
                            gate: float | None = None, ceiling: dict[str, float] | None = None,
                            ceiling_label: str = "ceiling", title: str = ""):  # fmt: skip
    """Per-attribute accuracy as bars, with chance level (1 / number of values), a ceiling per attribute (e.g. the
    judge on the VAE's reconstructions of true renders) and the gate if given."""
    names = list(accuracy)
    fig, ax = plt.subplots(figsize=(1.0 * len(names) + 1.5, 3.2))
    ax.bar(names, [accuracy[n] for n in names], color="tab:blue")
    if chance:
        ax.scatter(names, [chance[n] for n in names], marker="_", s=300, color="k", label="chance", zorder=3)
    if ceiling:
        marks = [ceiling.get(n, float("nan")) for n in names]
        ax.scatter(names, marks, marker="_", s=300, color="tab:green", label=ceiling_label, zorder=3)
    if gate is not None:
        ax.axhline(gate, color="tab:red", linestyle="--", label=f"gate (mean) {gate:g}")
    ax.set(ylim=(0, 1.05), ylabel="accuracy", title=title)
    ax.tick_params(axis="x", rotation=45, labelsize=7)
    if chance or ceiling or gate is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save(fig, out: Path, name: str) -> Path:
    """Save a figure into the run folder (PNG, 110 dpi, cropped to what is drawn) and return the path; the
    notebook still shows it."""
    path = Path(out) / name
    fig.savefig(path, dpi=110, bbox_inches="tight", pad_inches=0.05)
    return path
