"""Looking at a training run: its loss curves, a grid of generations on held-out people, a summary.

    read_log(folder)                  log.jsonl + val.jsonl of a stage folder as lists
    plot_training({"stage 1": folder}, "training.png")
    compare_schedules({"CLIP first": [s2, s3], "ArcFace from scratch": [s3only]}, "staging.png")
    validation_grid([("stage 2", folder / "model")], out_png="grid.png")   # + grid.json: toy-ArcFace similarities
    stage_configs(2, smoke=True)      the RunConfigs a notebook trains (earlier stages first)

The grid's rows are test-split people (never trained on); its columns are the reference render, the base
model without trigger words, then each checkpoint's LoRA fused with trigger words, one seed per row.
"""

from __future__ import annotations

import json
import math
import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch
from PIL import Image

from ..conditioning.faces import cosine_similarity
from .config import RunConfig, load_preset, resolve
from .loop import DONE_FILE

# The tests' tiny sizes: 3 people x 2 looks, batch 4, validation on 2 people every 2 steps.
SMOKE_RUN = {"num_identities": 3, "images_per_identity": 2, "batch_size": 4, "val_identities": 2, "val_every": 2,
             "checkpoint_every": 2, "log_every": 1, "threads": 1}  # fmt: skip
CELL_INCHES, DPI = 1.5, 100  # one grid cell is 150 x 150 pixels (plus a title band)
SMOKE_LABEL = "untrained / smoke: plumbing"


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def read_log(run_folder: str | Path) -> dict[str, list]:
    """log.jsonl's values by key (NaN where a line lacks one, e.g. a case not drawn), and val.jsonl's, whose
    step is `val_step`. A folder without val.jsonl gives no val keys."""
    folder = Path(run_folder)
    if not (folder / "log.jsonl").is_file():
        raise FileNotFoundError(f"{folder}: no log.jsonl (not a stage folder of hyperlora.train)")
    out = {}
    for lines, rename in ((_read_jsonl(folder / "log.jsonl"), {}), (_read_jsonl(folder / "val.jsonl"), {"step": "val_step"})):
        keys = list(dict.fromkeys(k for line in lines for k in line))
        out |= {rename.get(k, k): [line.get(k, math.nan) for line in lines] for k in keys}
    return out


def plot_training(run_folders: dict[str, str | Path], out_png: str | Path) -> Path:
    """One row per stage: the training loss (and per-case losses; the identity loss and its decoupling term on a
    second axis where they ran) against step; the validation loss with the right reference against a shuffled one,
    and their gap (positive: the LoRA carries the person)."""
    fig, axes = plt.subplots(len(run_folders), 2, figsize=(10, 3.2 * len(run_folders)), squeeze=False)
    for (label, folder), (left, right) in zip(run_folders.items(), axes):
        log = read_log(folder)
        left.plot(log["step"], log["loss"], color="black", label="loss")
        for case, colour in zip("abc", ("tab:blue", "tab:orange", "tab:green")):
            if f"loss_{case}" in log:
                left.plot(log["step"], log[f"loss_{case}"], color=colour, lw=0.8, alpha=0.7, label=f"case ({case})")
        left.set(title=f"{label}: training loss", xlabel="step", ylabel="loss (Min-SNR weighted)")
        left.legend(fontsize=7, loc="upper left")
        terms = [k for k in ("loss_id", "loss_decouple") if k in log]  # the identity loss and its decoupling
        if terms:
            twin = left.twinx()
            for key, colour in zip(terms, ("tab:purple", "tab:brown")):
                twin.plot(log["step"], log[key], color=colour, lw=0.8, label=f"{key} (1 - cosine)")
            twin.set_ylabel("recogniser 1 - cosine")
            twin.legend(fontsize=7, loc="upper right")
        if "val_step" in log:
            right.plot(log["val_step"], log["val_loss_right"], "o-", label="right reference")
            right.plot(log["val_step"], log["val_loss_shuffled"], "s--", label="shuffled reference")
            gap = right.twinx()
            gap.plot(log["val_step"], log["val_gap"], "^-", color="tab:red", lw=0.8, ms=4, label="gap")
            gap.set_ylabel("gap (shuffled - right)", color="tab:red")
            for ax in (right, gap):
                ax.ticklabel_format(axis="y", useOffset=False)
            right.legend(fontsize=7)
        else:
            right.text(0.5, 0.5, "no validation (val_every = 0)", ha="center", va="center", transform=right.transAxes)
        right.set(title=f"{label}: held-out case (a) loss", xlabel="step", ylabel="loss")
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return Path(out_png)


def schedule_curve(stage_folders: list[str | Path]) -> dict[str, list]:
    """The validation of ID stages run one after another, on one axis: steps counted from the first folder's
    start (each folder's steps offset by the steps of the folders before it), gap, coefficient cosine, stage;
    `starts`: the step at which each folder after the first begins."""
    curve: dict[str, list] = {"step": [], "val_gap": [], "val_coefficient_cosine": [], "stage": [], "starts": []}
    offset = 0
    for folder in map(Path, stage_folders):
        config = json.loads((folder / "config.json").read_text())
        if offset:
            curve["starts"].append(offset)
        for line in _read_jsonl(folder / "val.jsonl"):
            curve["step"].append(offset + line["step"])
            curve["val_gap"].append(line["val_gap"])
            curve["val_coefficient_cosine"].append(line.get("val_coefficient_cosine", math.nan))
            curve["stage"].append(config["stage"]["stage"])
        offset += config["stage"]["steps"]
    return curve


def compare_schedules(arms: dict[str, list[str | Path]], out_png: str | Path,
                      id_similarity: dict[str, list[tuple[int, float]]] | None = None, title: str = "") -> Path:  # fmt: skip
    """Issue 17's staging figure: per arm (label -> its ID stage folders in order), the held-out validation gap
    (shuffled - right reference; > 0: the LoRA carries the person) and the coefficient cosine between people
    (1: one LoRA for everyone) against ID-branch steps; with `id_similarity` (label -> (step, value) from the
    evaluation harness) a third panel. A vertical line marks where an arm changes stage."""
    panels = 3 if id_similarity else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.2 * panels, 3.4))
    for (label, folders), colour in zip(arms.items(), plt.rcParams["axes.prop_cycle"].by_key()["color"]):
        curve = schedule_curve(folders)
        axes[0].plot(curve["step"], curve["val_gap"], "o-", ms=3, color=colour, label=label)
        axes[1].plot(curve["step"], curve["val_coefficient_cosine"], "o-", ms=3, color=colour, label=label)
        for step in curve["starts"]:
            for ax in axes[:2]:
                ax.axvline(step, color=colour, ls=":", lw=0.8)
        if id_similarity and id_similarity.get(label):
            steps, values = zip(*sorted(id_similarity[label]))
            axes[2].plot(steps, values, "s-", color=colour, label=label)
    axes[0].axhline(0, color="grey", lw=0.8)
    axes[0].set(xlabel="ID-branch steps", ylabel="val loss gap (shuffled - right)", title="the right reference helps")
    axes[1].set(xlabel="ID-branch steps", ylabel="coefficient cosine between people", title="one LoRA per person")
    if id_similarity:
        axes[2].set(xlabel="ID-branch steps", ylabel="ID similarity (held-out people)", title="identity in the images")
    for ax in axes:
        ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=DPI)
    plt.close(fig)
    return Path(out_png)


def _cosine(a, b) -> float | None:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if np.isnan(a).any() or np.isnan(b).any():
        return None  # no face found
    return cosine_similarity(a, b)


def validation_grid(checkpoints: list[tuple[str, str | Path]], *, toy_dir: str | Path = "data/toy", num_people: int = 4,
                    prompt: str = "a portrait of a person, with a neutral expression", seed: int = 0, steps: int = 20,
                    guidance: float = 3.5, id_scale: float = 0.85, base_scale: float = 0.0, det_threshold: float = 0.5,
                    smoke: bool = False, out_png: str | Path) -> Path:  # fmt: skip
    """Held-out people x (reference | base model | each checkpoint), written to `out_png`, and beside it a JSON of
    each cell's toy-ArcFace similarity to the reference (null: no face found). Each person is personalised
    from one reference render; every column of a row uses the same seed."""
    from ..checkpoint import load_checkpoint
    from ..conditioning.backends import make_face_analyzer
    from ..conditioning.clip_features import ClipImageEncoder
    from ..conditioning.references import Conditioner
    from ..pipeline import PersonalizedPipeline, with_trigger
    from ..toy.identity import split_identities
    from ..toy.pipeline import face_judges, generate, load_toy_pipeline
    from ..toy.render import render_sample

    toy_dir = Path(toy_dir)
    pipe = load_toy_pipeline(toy_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    analyzer = make_face_analyzer("toy", model_dir=toy_dir / "faces", det_threshold=det_threshold)
    conditioner = Conditioner(analyzer, ClipImageEncoder(toy_dir / "clip", world="toy"), with_base=base_scale > 0,
                              min_face_size=8.0)  # fmt: skip
    people = list(split_identities("test"))[:num_people]
    references = [render_sample(person, 0, seed).image for person in people]
    row_seeds = [seed + row for row in range(num_people)]
    columns = {"reference": references, "base model": list(generate(pipe, [prompt] * num_people, seeds=row_seeds,
                                                                     steps=steps, guidance_scale=guidance))}  # fmt: skip
    for label, folder in checkpoints:
        model = load_checkpoint(folder, unet=pipe.unet, dtype=torch.float32).eval()
        personalized = PersonalizedPipeline(pipe, model, conditioner)
        text = with_trigger(prompt, personalized.trigger_words)
        images = []
        try:
            for reference, row_seed in zip(references, row_seeds):
                personalized.personalize([Image.fromarray(reference)], id_scale=id_scale, base_scale=base_scale)
                images.append(generate(pipe, [text], seeds=[row_seed], steps=steps, guidance_scale=guidance)[0])
        finally:
            personalized.reset()
        columns[label] = images
    _, embed = face_judges(toy_dir / "faces")
    reference_embeddings = embed(np.stack(references)).numpy()
    similarity = {label: [_cosine(e, r) for e, r in zip(embed(np.stack(images)).numpy(), reference_embeddings)]
                  for label, images in columns.items()}  # fmt: skip
    title = f'"{prompt}"; id_scale {id_scale}, base_scale {base_scale}, {steps} steps, guidance {guidance}'
    _draw_grid(columns, similarity, people, (SMOKE_LABEL + "\n" if smoke else "") + title, out_png)
    record = {"columns": list(columns), "people": people, "seeds": row_seeds, "similarity": similarity,
              "mean_similarity": {k: _mean(v) for k, v in similarity.items()}, "prompt": prompt, "steps": steps,
              "guidance": guidance, "id_scale": id_scale, "base_scale": base_scale, "smoke": smoke,
              "checkpoints": {label: str(folder) for label, folder in checkpoints}}  # fmt: skip
    Path(out_png).with_suffix(".json").write_text(json.dumps(record, indent=2) + "\n")
    return Path(out_png)


def _mean(values: list[float | None]) -> float | None:
    found = [v for v in values if v is not None]
    return float(np.mean(found)) if found else None


def _draw_grid(columns: dict[str, list], similarity: dict[str, list], people: list[int], title: str, out_png) -> None:
    rows, cols = len(people), len(columns)
    title = "\n".join(textwrap.fill(line, width=cols * 24) for line in title.split("\n"))
    band = 0.3 + 0.12 * (title.count("\n") + 1)  # inches above the cells: the title lines and the column labels
    height = rows * CELL_INCHES + band
    fig, axes = plt.subplots(rows, cols, figsize=(cols * CELL_INCHES, height), squeeze=False)
    for c, (label, images) in enumerate(columns.items()):
        axes[0, c].set_title(label, fontsize=8)
        for r, image in enumerate(images):
            ax = axes[r, c]
            ax.imshow(image, interpolation="nearest")
            ax.set_xticks([]), ax.set_yticks([])
            value = similarity[label][r]
            ax.set_xlabel("no face" if value is None else f"id sim {value:.2f}", fontsize=7, labelpad=1)
            if c == 0:
                ax.set_ylabel(f"person {people[r]}", fontsize=7)
    fig.suptitle(title, fontsize=7, y=0.995, va="top")
    fig.subplots_adjust(left=0.1 / cols, right=0.99, bottom=0.15 / height, top=1 - band / height, wspace=0.08,
                        hspace=0.2)  # fmt: skip
    fig.savefig(out_png, dpi=DPI)  # no bbox_inches: the PNG is exactly cols x 150 px wide
    plt.close(fig)


def stage_configs(stage: int, *, smoke: bool, steps: int | None = None, seed: int = 0, earlier: bool = True,
                  toy_dir: str | Path = "data/toy", people: int | None = None,
                  cache_dir: str | Path | None = None) -> list[RunConfig]:  # fmt: skip
    """The toy preset's RunConfigs of `stage` (after stages 1..stage-1 when `earlier`): smoke, the tests' tiny
    pool and 2 steps each; else the preset, with `steps` (default: the preset's) for `stage` itself. The toy
    models are read from `toy_dir` (made absolute: a notebook runs in notebooks/); `people` sizes the training pool
    and `cache_dir` shares its encoding between runs."""
    toy = Path(toy_dir).resolve()
    run = {"seed": seed, "pipeline": str(toy / "sdxl"), "clip": str(toy / "clip"), "faces": str(toy / "faces")}
    if people:  # train-split people in the pool (default: the preset's)
        run["num_identities"] = people
    if cache_dir:  # one encoded pool shared by several runs (the notebooks)
        run["cache_dir"] = str(Path(cache_dir).resolve())
    preset = load_preset("toy").get("stages", {})
    configs = []
    for s in range(1 if earlier else stage, stage + 1):
        overrides = {}
        if smoke:
            overrides = {"steps": 2, "warmup_steps": 1}
        elif s == stage and steps is not None:
            warmup = preset.get(str(s), {}).get("warmup_steps", 100)
            overrides = {"steps": steps, "warmup_steps": min(warmup, max(1, steps // 10))}
        configs.append(resolve("toy", s, run={**run, **(SMOKE_RUN if smoke else {})}, stage_overrides=overrides))
    return configs


def run_folder_of(checkpoint: str | Path) -> Path | None:
    """The stage folder holding a checkpoint's log.jsonl (the checkpoint itself or its parent), or None."""
    for folder in (Path(checkpoint), Path(checkpoint).parent):
        if (folder / "log.jsonl").is_file():
            return folder
    return None


def summarize(run_folder: str | Path) -> dict:
    """A stage folder's final figures: last logged loss (and per case), last validation gap, done.json."""
    folder = Path(run_folder)
    log = read_log(folder)
    last = {k: v[-1] for k, v in log.items() if k in ("step", "loss", "loss_a", "loss_b", "loss_c") and v}
    last = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in last.items()}
    val = {k: log[k][-1] for k in ("val_step", "val_loss_right", "val_loss_shuffled", "val_gap") if log.get(k)}
    done = json.loads((folder / DONE_FILE).read_text()) if (folder / DONE_FILE).is_file() else None
    return {"final": last, "validation": val, "done": done}
