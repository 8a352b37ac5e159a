"""Tuning curves of saved evaluation runs: ID similarity (or any per-image metric) against fine-tuning steps and
wall time, for every tuning method (`dreambooth`, `hyperlora_ft`, `zero_ft`, `coef_ft`: variants `name@steps`),
with the zero-shot methods of the same runs (`hyperlora`, `base`) as flat lines.

    table = tuning_table(["runs/eval/ft", "runs/eval/coef"])
    plot_tuning_curves(table, path="docs/figures/finetune_curves.png")

The spread is the standard error over people (each person's images averaged first), as `eval.summary.paired_gap`
does, so that it is the error of the figure a reader compares across methods.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import numpy as np

from .summary import load_records

ZERO_SHOT = ("hyperlora", "hyperlora_other", "base")


def tuning_table(runs, key: str = "id_sim") -> list[dict]:
    """One row per (run, variant): method, steps (None for zero-shot), seconds of personalisation (mean over
    people), the metric's mean over people, its standard error and the number of people."""
    rows = []
    for run in map(Path, [runs] if isinstance(runs, (str, Path)) else runs):
        summary = {r["variant"]: r for r in json.loads((run / "summary.json").read_text())["rows"]}
        per_person: dict[str, dict] = defaultdict(lambda: defaultdict(list))
        for record in load_records(run):
            if record.get(key) is not None and np.isfinite(record[key]):
                per_person[record["variant"]][record["identity"]].append(record[key])
        for variant, people in per_person.items():
            method, _, steps = variant.partition("@")
            if not steps and method not in ZERO_SHOT:
                continue
            means = np.array([np.mean(v) for v in people.values()])
            sem = float(means.std(ddof=1) / np.sqrt(len(means))) if len(means) > 1 else None
            row = summary.get(variant, {})  # dreambooth has no personalisation before its training
            ms = row.get("personalize_total_ms") or row.get("personalize_train_ms")
            rows.append({"run": str(run), "method": method, "variant": variant, "steps": int(steps) if steps else None,
                         "seconds": None if ms is None else ms / 1000, "mean": float(means.mean()), "sem": sem,
                         "n_identities": len(means), "metric": key, "weights": row.get("weights")})  # fmt: skip
    return rows


def plot_tuning_curves(table: list[dict], path=None, *, title: str = ""):
    """Two panels, the metric against steps and against seconds per person: a line with ± 1 s.e. per tuning
    method, a dashed level per zero-shot method."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8), sharey=True)
    tuned = defaultdict(list)
    for row in table:
        if row["steps"] is not None:
            tuned[row["method"]].append(row)
    for ax, x in zip(axes, ("steps", "seconds")):
        for method, rows in sorted(tuned.items()):
            rows = sorted(rows, key=lambda r: r["steps"])
            xs = [r[x] for r in rows]
            ax.errorbar(xs, [r["mean"] for r in rows], yerr=[r["sem"] or 0.0 for r in rows], marker="o", capsize=3,
                        label=method)  # fmt: skip
        for i, row in enumerate(r for r in table if r["steps"] is None):
            ax.axhline(row["mean"], ls="--", lw=1, color=f"C{len(tuned) + i}", label=f"{row['method']} (zero-shot)")
        ax.set_xlabel("fine-tuning steps" if x == "steps" else "seconds per person (personalisation + tuning)")
        ax.grid(alpha=0.3)
    metric = table[0]["metric"] if table else ""
    axes[0].set_ylabel(f"{metric} (mean ± s.e. over people)")
    axes[1].legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if path:
        fig.savefig(path, dpi=120)
    return fig
