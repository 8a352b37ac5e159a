"""The ablations' report: one table per ablation over its points' summaries (each figure's mean, spread over seeds
and failures) and one figure of ID similarity with the seeds' range. The points come from `eval.ablation`'s sweeps:
out/baseline (the preset's schedule, every seed) and out/<ablation> (its other values).

    python -m eval.ablation_report OUT [--ablations k,stage1] [--keep DIR]

writes OUT/ablation_<name>.png and OUT/ablations.json and prints the tables; `--keep DIR` copies what the tables
read (the sweeps' and points' summaries and the harness's, without images or checkpoints) into DIR, in the same
layout, so the report can be drawn again from DIR once OUT is gone (`python -m eval.ablation_report DIR`).
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np

from .ablation import SUMMARY
from .ablation_campaign import ABLATIONS, BASELINE, FIGURES

# Read from each point's harness summary (eval/summary.json) besides its own: the paired gap own - next person's
# (per person, over the same prompts and seeds) with its standard error over people, which gives a spread even for
# one training seed, how many people are above zero, and the look leakage of the own-reference images.
HARNESS_FIGURES = ("id_sim_gap_sem", "id_sim_gap_above_zero", "leakage")
TABLE_FIGURES = FIGURES + HARNESS_FIGURES
HARNESS_SUMMARY = Path("eval") / SUMMARY


def harness_figures(point: Path) -> dict:
    """HARNESS_FIGURES of one point from its eval/summary.json ({} when it has none)."""
    path = point / HARNESS_SUMMARY
    if not path.is_file():
        return {}
    harness = json.loads(path.read_text())
    gap = harness.get("control_gap", {}).get("id_sim") or {}
    own = next((row for row in harness["rows"] if row["variant"] == "hyperlora"), {})
    return {"id_sim_gap_sem": gap.get("sem"), "id_sim_gap_above_zero": gap.get("identities_above_zero"),
            "leakage": own.get("leakage_mean")}  # fmt: skip


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
                points[value].append(json.loads(path.read_text()) | harness_figures(folder / row["point"]))
            else:
                failed[value] += 1
    table = []
    for value, summaries in points.items():
        entry = {key: value, "seeds": [s["seed"] for s in summaries], "failed": failed[value],
                 "label": summaries[0]["label"] if summaries else None}  # fmt: skip
        for figure in TABLE_FIGURES:
            got = np.array([s[figure] for s in summaries if s.get(figure) is not None], dtype=float)
            entry |= {f"{figure}_mean": float(got.mean()) if got.size else None,
                      f"{figure}_seed_std": float(got.std(ddof=1)) if got.size > 1 else (0.0 if got.size else None),
                      f"{figure}_min": float(got.min()) if got.size else None,
                      f"{figure}_max": float(got.max()) if got.size else None}  # fmt: skip
        table.append(entry)
    return table


def _series(table: list[dict], figure: str, stat: str) -> np.ndarray:
    return np.array([np.nan if t[f"{figure}_{stat}"] is None else t[f"{figure}_{stat}"] for t in table])


def _tick(entry: dict, key: str) -> str:
    seeds = len(entry["seeds"])
    return (
        f"{entry[key]}\n"
        + (f"{seeds} seed(s)" if seeds or entry["failed"] else "not run")
        + (f", {entry['failed']} failed" if entry["failed"] else "")
    )


def plot_ablation(name: str, table: list[dict], out_png: str | Path, *, note: str = "") -> Path:
    """Per value: ID similarity with the person's own references, with the next person's and the base model's (the
    floor); the gap own - next person's; the coefficient re-identification top-1. Points are the seeds' mean with bars
    from their min to their max; the gap also shows ± its standard error over people (paired, the seeds' mean), the
    spread a single seed has."""
    import matplotlib.pyplot as plt

    key, _, what = ABLATIONS[name]
    x = np.arange(len(table))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.8))
    left = (("id_sim", "own references", "o-"), ("id_sim_other_refs", "next person's references (control)", "s--"),
            ("id_sim_base", "base model (floor)", ":"))  # fmt: skip
    panels = ((axes[0], left), (axes[1], (("id_sim_gap", "own - next person's (seeds' range)", "^-"),)),
              (axes[2], (("reid_top1", "coefficient re-identification top-1", "D-"),)))  # fmt: skip
    for ax, series in panels:
        for figure, label, style in series:
            mean, low, high = (_series(table, figure, stat) for stat in ("mean", "min", "max"))
            ax.errorbar(x, mean, yerr=[mean - low, high - mean], fmt=style, capsize=4, label=label)
        ax.set_xticks(x, [_tick(t, key) for t in table])
        ax.set_xlim(-0.5, len(table) - 0.5)  # every value's tick, also where nothing was measured
        ax.set_xlabel(key)
    gap, sem = _series(table, "id_sim_gap", "mean"), _series(table, "id_sim_gap_sem", "mean")
    if np.isfinite(sem).any():
        axes[1].errorbar(x + 0.08, gap, yerr=sem, fmt="none", ecolor="black", capsize=6, lw=2,
                         label="± standard error over people")  # fmt: skip
    for ax in axes:
        ax.legend(fontsize=7)
    axes[0].set_ylabel("ID similarity (toy ArcFace cosine)")
    axes[1].set_ylabel("ID similarity gap")
    axes[1].axhline(0, color="grey", lw=0.8)
    axes[2].set_ylabel("top-1 (held-out people)")
    axes[2].set_ylim(0, axes[2].get_ylim()[1] * 1.1)
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

    widths = {f: max(20, len(f) + 2) for f in TABLE_FIGURES}
    lines = [f"{key:>10}{'seeds':>7}{'failed':>7}" + "".join(f"{f:>{widths[f]}}" for f in TABLE_FIGURES)]
    for entry in table:
        cells = "".join(f"{cell(entry, f):>{widths[f]}}" for f in TABLE_FIGURES)
        lines.append(f"{entry[key]:>10}{len(entry['seeds']):>7}{entry['failed']:>7}{cells}")
    return "\n".join(lines)


def markdown_table(name: str, table: list[dict]) -> str:
    """The headline figures as a markdown table (the README's): a mean, ± the seeds' std where there are several
    seeds, and the paired gap ± its standard error over people."""
    key, _, what = ABLATIONS[name]

    def value(entry: dict, figure: str, digits: int = 3) -> str:
        mean, std = entry[f"{figure}_mean"], entry[f"{figure}_seed_std"]
        if mean is None:
            return "-"
        return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f} (seeds)" if len(entry["seeds"]) > 1 else "")

    def gap(entry: dict) -> str:
        mean, sem, above = (entry[f"{f}_mean"] for f in ("id_sim_gap", "id_sim_gap_sem", "id_sim_gap_above_zero"))
        if mean is None:
            return "-"
        return (
            f"{mean:+.3f}"
            + (f" ± {sem:.3f}" if sem is not None else "")
            + (f" ({above:.0f} above 0)" if above is not None else "")
        )

    head = [key, "seeds", "own", "next person's", "gap (± SE over people)", "base", "re-ID top-1", "adherence",
            "leakage", "CLIP-T"]  # fmt: skip
    lines = [f"{what}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for entry in table:
        seeds = len(entry["seeds"]) or ("failed" if entry["failed"] else "not run")
        cells = [f"**{entry[key]}**" if entry is table[0] else str(entry[key]), str(seeds), value(entry, "id_sim"),
                 value(entry, "id_sim_other_refs"), gap(entry), value(entry, "id_sim_base"),
                 value(entry, "reid_top1", 2), value(entry, "adherence"), value(entry, "leakage"),
                 value(entry, "clip_t")]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def keep(out: Path, names: list[str], dest: Path) -> int:
    """Copy what the tables read (sweep and point summaries, the harness's summary.json) from out to dest; returns
    how many files were copied."""
    copied = 0
    for folder in ["baseline", *names]:
        sweep = out / folder / SUMMARY
        if not sweep.is_file():
            continue
        for source in [sweep, *(out / folder / row["point"] / name for row in json.loads(sweep.read_text())
                                for name in (SUMMARY, HARNESS_SUMMARY))]:  # fmt: skip
            if source.is_file():
                target = dest / source.relative_to(out)
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(source, target)
                copied += 1
    return copied


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.ablation_report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("out", type=Path, help="the ablations' folder (notebook 07's out_dir)")
    p.add_argument("--ablations", default=",".join(ABLATIONS), help="comma-separated (default: all)")
    p.add_argument("--keep", type=Path, help="copy the summaries the tables read into this folder")
    p.add_argument("--note", default="", help="appended to every figure's title (e.g. the training size)")
    args = p.parse_args(argv)
    names = [n.strip() for n in args.ablations.split(",") if n.strip()]
    unknown = sorted(set(names) - set(ABLATIONS))
    if unknown or not args.out.is_dir():
        p.error(f"unknown ablations {unknown}; ablations: {sorted(ABLATIONS)}" if unknown
                else f"{args.out} is not a folder")  # fmt: skip
    tables, markdown = {}, []
    for name in names:
        tables[name] = ablation_table(name, args.out)
        png = plot_ablation(name, tables[name], args.out / f"ablation_{name}.png", note=args.note)
        markdown.append(markdown_table(name, tables[name]))
        print(format_table(name, tables[name]), f"\n-> {png}\n")
    (args.out / "ablations.json").write_text(json.dumps(tables, indent=2) + "\n")
    (args.out / "ablations.md").write_text("\n\n".join(markdown) + "\n")
    print(f"wrote {args.out / 'ablations.json'} and {args.out / 'ablations.md'}")
    if args.keep:
        print(f"kept {keep(args.out, names, args.keep)} summaries in {args.keep}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
