"""Summaries of an evaluation run: a table row per method variant (means and spread over seeds), the
toy world's leakage and adherence, LPIPS diversity, the CSV/JSON writers and the image grids.

eval/protocol.py gathers the records; this file turns them into summary.json/.csv and grid_<variant>.png.
"""

from __future__ import annotations

import csv
import dataclasses
import json
from pathlib import Path

import numpy as np
from PIL import Image

from . import metrics


def json_default(value):
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _write_csv(path: Path, rows: list[dict]) -> None:
    columns = list(dict.fromkeys(k for row in rows for k, v in row.items() if not isinstance(v, (dict, list))))
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


# ---------------------------------------------------------------------------------------------
# Summaries and grids

PER_IMAGE = ("id_sim", "clip_t", "clip_i_fidelity", "clip_i_disruption", "lpips_preservation", "pixel_change",
             "trait_match", "face_texture")


def _seed_matrix(rows: list[dict], key: str) -> np.ndarray | None:
    """[groups, seeds] of one per-image value, a group per (identity, prompt); groups missing a value are left out."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in rows:
        groups.setdefault((r["identity"], r["prompt_index"]), {})[r["seed_index"]] = r.get(key, float("nan"))
    matrix = [[g[s] for s in sorted(g)] for g in groups.values()]
    matrix = [m for m in matrix if np.all(np.isfinite(m))]
    return np.array(matrix, dtype=np.float64) if matrix else None


def _attribute_metrics(rows: list[dict]) -> dict:
    """Toy look leakage and prompt adherence from the attribute judge's predictions (None where undefined)."""
    if not rows or "predicted" not in rows[0]:
        return {}
    predicted, asked = [r["predicted"] for r in rows], [r["prompt_attributes"] for r in rows]
    out = dict.fromkeys(("leakage_mean", "leakage_per_attribute", "adherence_mean", "adherence_per_attribute"))
    try:
        leakage = metrics.look_leakage(predicted, [r["reference_attributes"] for r in rows], asked)
        out.update(leakage_mean=leakage["leakage_mean"], leakage_per_attribute=leakage["per_attribute"])
    except ValueError:  # no prompt asked for a value unlike the references': leakage is undefined
        pass
    try:
        adherence = metrics.prompt_adherence(predicted, asked)
        out.update(adherence_mean=adherence["adherence_mean"], adherence_per_attribute=adherence["per_attribute"])
    except ValueError:  # no prompt names an attribute
        pass
    return out


def _diversity(rows: list[dict], out: Path, world) -> dict:
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["identity"], r["prompt_index"]), []).append(np.asarray(Image.open(out / r["image"])))
    if min(len(g) for g in groups.values()) < 2:
        return {"lpips_diversity": None}
    result = metrics.lpips_diversity([np.stack(g) for g in groups.values()], world.lpips)
    return {"lpips_diversity": result["lpips_diversity"]}


def summarize_variant(rows: list[dict], timings: list[dict], method, world, out: Path) -> dict:
    """One table row: every metric's mean (and spread over seeds), timings and the weights label."""
    row = {"method": rows[0]["method"], "variant": rows[0]["variant"], "n_images": len(rows),
           "n_identities": len({r["identity"] for r in rows}), "weights": method.label,
           "label": "PLUMBING, NOT RESULTS: " + world.label if world.plumbing_only or method.plumbing_only
           else world.label, "lpips_real": world.lpips.real}  # fmt: skip
    for key in PER_IMAGE:
        matrix = _seed_matrix(rows, key)
        if matrix is None:
            row[key] = None
            continue
        s = metrics.summarize(matrix, seed_axis=1)
        row.update({key: s["mean"], f"{key}_std": s["std"], f"{key}_seed_std": s["seed_std"], f"{key}_n": s["n"],
                    f"{key}_seed_means": s["seed_means"]})  # fmt: skip
    row["clip_t_x100"] = None if row["clip_t"] is None else 100 * row["clip_t"]
    row["face_failure_rate"] = float(1 - np.mean([r["detected"] for r in rows]))
    neutral = [r["id_sim"] for r in rows if r["category"] == "neutral" and np.isfinite(r["id_sim"])]
    row["id_sim_neutral"] = float(np.mean(neutral)) if neutral else None
    row.update(_diversity(rows, out, world))
    row.update(_attribute_metrics(rows))
    if world.not_available:  # sdxl: toy-only metrics, None with the reason (see world.not_available)
        row.update(dict.fromkeys(world.not_available), not_available=dict(world.not_available))
    for key in sorted({k for t in timings for k in t if k.endswith("_ms")}):
        values = [t[key] for t in timings if np.isfinite(t.get(key, float("nan")))]
        row[f"personalize_{key}"] = float(np.mean(values)) if values else None
    row["personalization_failures"] = sum(bool(t.get("failed")) for t in timings)
    row["generation_ms_per_image"] = float(np.mean([r["generation_ms"] for r in rows]))
    if "dreambooth_steps" in timings[0]:  # every tuning method (dreambooth, hyperlora_ft, zero_ft): its step count
        row["dreambooth_steps"] = timings[0]["dreambooth_steps"]
        row["dreambooth_final_loss"] = float(np.mean([t["final_loss"] for t in timings]))
    return row


def summarize_run(records: list[dict], timings: list[dict], methods: dict, world, config,
                  out: Path) -> dict:  # fmt: skip
    """summary.json: the table rows (one per method variant), the timings per identity and the labels."""
    variants = list(dict.fromkeys(r["variant"] for r in records))
    rows = []
    for variant in variants:
        mine = [r for r in records if r["variant"] == variant]
        rows.append(summarize_variant(mine, [t for t in timings if t["variant"] == variant],
                                      methods[mine[0]["method"]], world, out))  # fmt: skip
    return {"world": config.world, "label": rows[0]["label"] if rows else world.label, "rows": rows,
            "control_gap": control_gaps(records),
            "not_available": dict(world.not_available), "timings": timings,
            "config": dataclasses.asdict(config)}  # fmt: skip


def control_gaps(records: list[dict], keys: tuple[str, ...] = ("id_sim", "trait_match")) -> dict[str, dict]:
    """figure 2's control: `paired_gap` of hyperlora against hyperlora_other per metric, where both are present."""
    gaps = {key: paired_gap(records, "hyperlora", "hyperlora_other", key) for key in keys}
    return {key: gap for key, gap in gaps.items() if gap is not None}


def paired_gap(records: list[dict], variant: str, control: str, key: str) -> dict | None:
    """`variant` minus `control` on the same (identity, prompt, seed), so the seeds' and prompts' shared noise cancels:
    the mean difference, its standard error over identities (each identity's mean difference is one sample) and how
    many identities it is above zero for. None when either variant or the metric is missing."""
    values: dict[str, dict[tuple, float]] = {variant: {}, control: {}}
    for r in records:
        if r["variant"] in values and np.isfinite(r.get(key, float("nan"))):
            values[r["variant"]][(r["identity"], r["prompt_index"], r["seed_index"])] = r[key]
    shared = values[variant].keys() & values[control].keys()
    if not shared:
        return None
    per_identity: dict = {}
    for k in shared:
        per_identity.setdefault(k[0], []).append(values[variant][k] - values[control][k])
    means = np.array([np.mean(v) for v in per_identity.values()])
    sem = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None
    return {"variant": variant, "control": control, "metric": key, "mean": float(means.mean()), "sem": sem,
            "identities_above_zero": int((means > 0).sum()), "n_identities": len(means), "n_pairs": len(shared)}


def write_grids(out: Path, records: list[dict], identities: list[dict]) -> list[Path]:
    """grid_<variant>.png: a row per identity, references then seed 0 of every prompt (2x upscaled)."""
    paths = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        rows = []
        for identity in identities:
            mine = sorted((r for r in records if r["variant"] == variant and r["identity"] == identity["id"]
                           and r["seed_index"] == 0), key=lambda r: r["prompt_index"])  # fmt: skip
            tiles = list(identity["images"]) + [np.full_like(identity["images"][0], 255)]  # a white gap
            tiles += [np.asarray(Image.open(out / r["image"]).convert("RGB")) for r in mine]
            rows.append(np.concatenate(tiles, axis=1))
        grid = Image.fromarray(np.concatenate(rows, axis=0))
        path = out / f"grid_{variant.replace('@', '_')}.png"
        grid.resize((grid.width * 2, grid.height * 2), Image.NEAREST).save(path)
        paths.append(path)
    return paths


TABLE_COLUMNS = ("id_sim", "trait_match", "clip_t", "clip_i_fidelity", "clip_i_disruption", "lpips_diversity",
                 "lpips_preservation", "leakage_mean", "adherence_mean")  # fmt: skip


def format_table(rows: list[dict], columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """The summary rows as a fixed-width text table (variant, metrics, personalisation time, weights)."""
    head = f"{'variant':<16}" + "".join(f"{c[:12]:>13}" for c in columns) + f"{'personal. ms':>13}  weights"
    lines = [head]
    for row in rows:
        ms = row.get("personalize_total_ms", row.get("personalize_train_ms"))
        cells = "".join(f"{row[c]:>13.4f}" if isinstance(row.get(c), float) else f"{'-':>13}" for c in columns)
        lines.append(f"{row['variant']:<16}{cells}{ms if ms is None else round(ms, 1)!s:>13}  {row['weights']}")
    return "\n".join(lines)


def load_records(run_dir: str | Path) -> list[dict]:
    """A saved run's per-image records: records_traits.jsonl when `eval.rescore` wrote one, else records.jsonl."""
    run = Path(run_dir)
    path = run / "records_traits.jsonl" if (run / "records_traits.jsonl").is_file() else run / "records.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def run_control_gap(run_dir: str | Path, key: str = "id_sim") -> dict | None:
    """`paired_gap` of a saved run's records."""
    return paired_gap(load_records(run_dir), "hyperlora", "hyperlora_other", key)


def plot_control_gaps(runs: dict[str, str | Path], keys: tuple[str, ...] = ("id_sim", "trait_match"), path=None):
    """One horizontal bar per run (label -> run folder): the paired control gap per metric, with two standard errors
    as whiskers and a line at zero; a gap whose whiskers clear zero is one the test can see."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 0.45 * len(runs) + 1.4), sharey=True,
                             squeeze=False)  # fmt: skip
    labels = list(runs)
    for ax, key in zip(axes[0], keys):
        gaps = [run_control_gap(runs[label], key) for label in labels]
        ys = [i for i, g in enumerate(gaps) if g is not None]
        means = [gaps[i]["mean"] for i in ys]
        errors = [2 * (gaps[i]["sem"] or 0.0) for i in ys]
        ax.barh(ys, means, xerr=errors, color=["tab:green" if m - e > 0 else "tab:grey" for m, e in zip(means, errors)],
                capsize=3)  # fmt: skip
        ax.axvline(0, color="black", lw=0.8)
        ax.set_title(f"{key}: own minus next person's references", fontsize=9)
        ax.set_xlabel("paired gap (mean ± 2 s.e. over people)")
    axes[0][0].set_yticks(range(len(labels)), labels, fontsize=8)
    axes[0][0].invert_yaxis()
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
