"""The ablations' report: one table per ablation over its points' summaries (each figure's mean, spread over seeds
and failures) and one figure of ID similarity with the seeds' range. The points come from `eval.ablation`'s sweeps:
out/baseline (the preset's schedule, every seed) and out/<ablation> (its other values).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .ablation import ABLATIONS, BASELINE, FIGURES, SUMMARY


def ablation_table(name: str, out: str | Path) -> list[dict]:
    """Per value of the ablation (the baseline's first): each figure's mean, seed std, min and max over the points
    that finished, their seeds, and how many points failed."""
    key, values, _ = ABLATIONS[name]
    points: dict[str, list[dict]] = {str(v): [] for v in (BASELINE[key], *values)}
    failed = dict.fromkeys(points, 0)
    for folder in (Path(out) / "baseline", Path(out) / name):
        rows = json.loads((folder / "summary.json").read_text()) if (folder / "summary.json").is_file() else []
        for row in rows:
            value = str(BASELINE[key]) if folder.name == "baseline" else str(row[key])
            path = folder / row["point"] / SUMMARY
            if row["status"] == "done" and path.is_file():
                points[value].append(json.loads(path.read_text()))
            else:
                failed[value] += 1
    table = []
    for value, summaries in points.items():
        entry = {key: value, "seeds": [s["seed"] for s in summaries], "failed": failed[value],
                 "label": summaries[0]["label"] if summaries else None}  # fmt: skip
        for figure in FIGURES:
            got = np.array([s[figure] for s in summaries if s.get(figure) is not None], dtype=float)
            entry |= {f"{figure}_mean": float(got.mean()) if got.size else None,
                      f"{figure}_seed_std": float(got.std(ddof=1)) if got.size > 1 else (0.0 if got.size else None),
                      f"{figure}_min": float(got.min()) if got.size else None,
                      f"{figure}_max": float(got.max()) if got.size else None}  # fmt: skip
        table.append(entry)
    return table


def plot_ablation(name: str, table: list[dict], out_png: str | Path, *, note: str = "") -> Path:
    """ID similarity with the person's own references, with the next person's and the base model's (the floor), and
    the gap own - next person's, per value: the seeds' mean, with bars from their min to their max."""
    import matplotlib.pyplot as plt

    key, _, what = ABLATIONS[name]
    x = np.arange(len(table))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    left = (("id_sim", "own references", "o-"), ("id_sim_other_refs", "next person's references (control)", "s--"),
            ("id_sim_base", "base model (floor)", ":"))  # fmt: skip
    for ax, series in ((axes[0], left), (axes[1], (("id_sim_gap", "own - next person's", "^-"),))):
        for figure, label, style in series:
            mean, low, high = (np.array([np.nan if t[f"{figure}_{s}"] is None else t[f"{figure}_{s}"] for t in table])
                               for s in ("mean", "min", "max"))  # fmt: skip
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt=style, capsize=4, label=label)
        ax.set_xticks(x, [f"{t[key]}\n{len(t['seeds'])} seed(s)" + (f", {t['failed']} failed" if t["failed"] else "")
                          for t in table])  # fmt: skip
        ax.set_xlabel(key)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ID similarity (toy ArcFace cosine)")
    axes[1].set_ylabel("ID similarity gap")
    axes[1].axhline(0, color="grey", lw=0.8)
    plumbing = any((t["label"] or "").startswith("PLUMBING") for t in table)  # the harness's label, on the figure
    fig.suptitle(("PLUMBING, NOT RESULTS: " if plumbing else "") + f"{what}{note}", fontsize=9)
    fig.tight_layout()
    fig.savefig(out_png, dpi=120)
    plt.close(fig)
    return Path(out_png)


def format_table(name: str, table: list[dict]) -> str:
    """The table as fixed-width text: per value, each figure's seed mean ± seed std, the seeds and failures."""
    key = ABLATIONS[name][0]

    def cell(entry: dict, figure: str) -> str:
        mean, std = entry[f"{figure}_mean"], entry[f"{figure}_seed_std"]
        return "-" if mean is None else f"{mean:.4f} ± {std:.4f}"

    lines = [f"{key:>10}{'seeds':>7}{'failed':>7}" + "".join(f"{f:>20}" for f in FIGURES)]
    for entry in table:
        cells = "".join(f"{cell(entry, f):>20}" for f in FIGURES)
        lines.append(f"{entry[key]:>10}{len(entry['seeds']):>7}{entry['failed']:>7}{cells}")
    return "\n".join(lines)
