r"""Identity interpolation over several person pairs: a sweep of notebook 08, averaged.

    python -m hyperlora.sweep notebooks/08_sliders.ipynb --grid person_a=0,4 --grid person_b=1,5 \
        --param widgets=False --out runs/sweeps/sliders
    python -m eval.slider_sweep runs/sweeps/sliders --out docs/figures/slider_interpolation.png

One pair's curves are noisy (4 seeds per point, and how much the base model's faces resemble B by chance sets B's
level), so this reads every finished point's `summary.json` (`interpolation`: t, ID similarity to A and to B) and
reports the mean over pairs with its standard error, the mean of (to B - to A), and whether the mean curves are
monotonic.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def interpolation_table(sweep_dir: str | Path) -> dict:
    """The interpolation curves of every finished point of a notebook-08 sweep, and their mean over pairs."""
    points = sorted(p.parent for p in Path(sweep_dir).glob("*/summary.json"))
    if not points:
        raise FileNotFoundError(f"{sweep_dir}: no point folder with a summary.json (a notebook-08 sweep's output)")
    curves = {}
    for point in points:
        summary = json.loads((point / "summary.json").read_text())
        if "interpolation" not in summary:
            raise ValueError(f"{point / 'summary.json'}: no 'interpolation' entry: not notebook 08's summary")
        curves[point.name] = summary["interpolation"] | {"untrained": summary.get("untrained", False)}
    ts = {tuple(c["t"]) for c in curves.values()}
    if len(ts) != 1:
        raise ValueError(f"{sweep_dir}: the points interpolate at different t ({len(ts)} sets): sweep with one num_t")
    a = np.array([c["id_sim_a"] for c in curves.values()], dtype=float)
    b = np.array([c["id_sim_b"] for c in curves.values()], dtype=float)

    def sem(x):
        return (x.std(0, ddof=1) / np.sqrt(len(x))).tolist() if len(x) > 1 else [None] * x.shape[1]

    mean_a, mean_b = a.mean(0), b.mean(0)
    return {"t": list(next(iter(ts))), "pairs": list(curves), "curves": curves,
            "id_sim_a": mean_a.tolist(), "id_sim_a_sem": sem(a), "id_sim_b": mean_b.tolist(), "id_sim_b_sem": sem(b),
            "b_minus_a": (b - a).mean(0).tolist(), "monotonic_a": bool((np.diff(mean_a) <= 0).all()),
            "monotonic_b": bool((np.diff(mean_b) >= 0).all()),
            "untrained": any(c["untrained"] for c in curves.values())}  # fmt: skip


def plot_interpolation(table: dict, path: str | Path | None = None, title: str = ""):
    """Mean ID similarity to A and to B along the path (error bars: standard error over pairs), one faint line per
    pair; returns the figure."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for curve in table["curves"].values():
        ax.plot(curve["t"], curve["id_sim_a"], color="tab:blue", alpha=0.25, lw=1)
        ax.plot(curve["t"], curve["id_sim_b"], color="tab:orange", alpha=0.25, lw=1)
    for key, colour, label in (("id_sim_a", "tab:blue", "to A"), ("id_sim_b", "tab:orange", "to B")):
        errors = [e or 0.0 for e in table[f"{key}_sem"]]
        ax.errorbar(
            table["t"], table[key], yerr=errors, color=colour, marker="o", capsize=3, label=f"ID similarity {label}"
        )
    ax.set_xlabel("t (0: person A's LoRA, 1: person B's)")
    ax.set_ylabel("toy ArcFace cosine")
    tag = "UNTRAINED HyperLoRA: " if table["untrained"] else ""
    ax.set_title(
        f"{tag}{title or 'identity interpolation'} ({len(table['pairs'])} pairs; faint: each pair)", fontsize=9
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.slider_sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("sweep_dir", help="a hyperlora.sweep output folder of notebooks/08_sliders.ipynb")
    parser.add_argument("--out", help="figure path (.png); default: SWEEP_DIR/interpolation_mean.png")
    args = parser.parse_args(argv)
    try:
        table = interpolation_table(args.sweep_dir)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    plot_interpolation(table, args.out or Path(args.sweep_dir) / "interpolation_mean.png")
    print(f"{len(table['pairs'])} pairs: {', '.join(table['pairs'])}")
    print("t          " + " ".join(f"{t:>7.3f}" for t in table["t"]))
    for key in ("id_sim_a", "id_sim_b", "b_minus_a"):
        print(f"{key:<11}" + " ".join(f"{v:>7.3f}" for v in table[key]))
    print(f"monotonic: to A falls {table['monotonic_a']}, to B rises {table['monotonic_b']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
