"""Compare check-0 runs (`python -m eval.carry`) of different base models or trained parts, paired by person.

    python -m eval.carry_report "shipped=runs/framing/carry_lora_shipped_*" "x1.3=runs/framing/carry_lora_1.3" \
        --figure docs/figures/framing_check0.png --keep docs/framing

Each argument is LABEL=FOLDER (a glob may name several folders, whose rows are pooled: one person split over two
runs). A run scored at several guidance scales (`eval.carry --guidance 3.5,5`) becomes one arm per scale, labelled
"LABEL g=5.0", the harness's default scale first (rows from before the field existed were sampled at it).
Prints, per arm and step count, the mean ID similarity over the prompts and on the neutral prompt, the
adherence and each person's figure, then every arm's paired difference to the first arm (mean ± standard error
over the people both scored). `--figure` draws ID similarity against steps, one line per person and the mean;
`--keep DIR` copies each arm's results.json (and its grids with `--grids`) so that the report can be drawn again
after `runs/` is gone.
"""

from __future__ import annotations

import argparse
import glob
import json
import shutil
from pathlib import Path

import numpy as np

from .protocol import EvalConfig
from .summary import paired_gap

DEFAULT_GUIDANCE = EvalConfig.guidance  # what eval.carry sampled at before it recorded the scale


def load_arm(spec: str) -> tuple[str, list[dict], list[Path]]:
    """LABEL=FOLDER[glob] -> (label, the pooled rows, the folders)."""
    label, sep, pattern = spec.partition("=")
    if not sep or not label or not pattern:
        raise SystemExit(f"an arm is LABEL=FOLDER, got {spec!r}")
    folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "results.json").is_file())
    if not folders:
        raise SystemExit(f"arm {label!r}: no results.json under {pattern!r} (run python -m eval.carry first)")
    rows = [row for folder in folders for row in json.loads((folder / "results.json").read_text())["rows"]]
    return label, rows, folders


def split_guidance(label: str, rows: list[dict]) -> list[tuple[str, list[dict]]]:
    """One arm per guidance scale the rows were sampled at ("LABEL g=7.5"), the default scale first; one scale
    keeps the label as it is."""
    scales = sorted({r.get("guidance", DEFAULT_GUIDANCE) for r in rows}, key=lambda g: (g != DEFAULT_GUIDANCE, g))
    if len(scales) == 1:
        return [(label, rows)]
    return [(f"{label} g={g}", [r for r in rows if r.get("guidance", DEFAULT_GUIDANCE) == g]) for g in scales]


def by_person(rows: list[dict], steps: int) -> dict[int, float]:
    """Each person's ID similarity over all prompts after `steps`."""
    return {r["identity"]: r["id_sim_all"] for r in rows if r["steps"] == steps}


def step_counts(rows: list[dict]) -> list[int]:
    return sorted({r["steps"] for r in rows})


def markdown(arms: list[tuple[str, list[dict]]]) -> str:
    lines = ["| arm | steps | people | ID sim, all prompts | neutral prompt | adherence | per person |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for label, rows in arms:
        for steps in step_counts(rows):
            at = sorted((r for r in rows if r["steps"] == steps), key=lambda r: r["identity"])
            adherence = [r["adherence"] for r in at if r["adherence"] is not None]
            neutral = [r["id_sim_neutral"] for r in at if r["id_sim_neutral"] is not None]  # None: not scored
            lines.append(f"| {label} | {steps} | {len(at)} | {np.mean([r['id_sim_all'] for r in at]):.3f} | "
                         f"{np.mean(neutral) if neutral else float('nan'):.3f} | "
                         f"{np.mean(adherence) if adherence else float('nan'):.2f} | "
                         f"{', '.join(format(r['id_sim_all'], '.2f') for r in at)} |")  # fmt: skip
    return "\n".join(lines)


def paired(arms: list[tuple[str, list[dict]]]) -> list[str]:
    """Every arm against the first, per step count both have: `summary.paired_gap` over the people both scored."""
    (ref_label, ref), out = arms[0], []
    for label, rows in arms[1:]:
        for steps in sorted(set(step_counts(rows)) & set(step_counts(ref))):
            records = [{"variant": name, "identity": person, "prompt_index": 0, "seed_index": 0, "id_sim": value}
                       for name, arm in ((label, rows), (ref_label, ref))
                       for person, value in by_person(arm, steps).items()]  # fmt: skip
            gap = paired_gap(records, label, ref_label, "id_sim")
            if gap is None:
                continue
            se = float("nan") if gap["sem"] is None else gap["sem"]
            out.append(f"{label} - {ref_label} at {steps} steps: {gap['mean']:+.3f} ± {se:.3f} "
                       f"over {gap['n_identities']} people")  # fmt: skip
    return out


def figure(arms: list[tuple[str, list[dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (label, rows) in enumerate(arms):
        colour, steps = f"C{i}", step_counts(rows)
        for person in sorted({r["identity"] for r in rows}):
            points = [(s, by_person(rows, s).get(person)) for s in steps]
            points = [(s, v) for s, v in points if v is not None]
            ax.plot(*zip(*points), color=colour, alpha=0.25, lw=1)
        ax.plot(steps, [np.mean(list(by_person(rows, s).values())) for s in steps], color=colour, lw=2.5,
                marker="o", label=label)  # fmt: skip
    ax.axhline(0.5, color="grey", ls="--", lw=1, label="check 0 target (0.5)")
    ax.set(xlabel="fine-tuning steps on one person's references", ylabel="ID similarity, all prompts",
           title="Check 0: can the base model carry a person? (thin: per person)")  # fmt: skip
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.carry_report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("arms", nargs="+", help="LABEL=FOLDER (a glob pools folders); the first is the reference")
    parser.add_argument("--figure", type=Path, help="write ID similarity against steps here (png)")
    parser.add_argument("--keep", type=Path, help="copy each arm's results.json to DIR/<label>/")
    parser.add_argument("--grids", action="store_true", help="with --keep, copy the grids too (about 0.5 MB a person)")
    args = parser.parse_args(argv)
    loaded = [load_arm(spec) for spec in args.arms]
    labels = [label for label, _, _ in loaded]
    if len(set(labels)) < len(labels):
        raise SystemExit(f"arm labels must differ, got {labels}")
    arms = [arm for label, rows, _ in loaded for arm in split_guidance(label, rows)]
    print(markdown(arms))
    for line in paired(arms):
        print(line)
    if args.figure:
        figure(arms, args.figure)
        print(f"figure: {args.figure}")
    if args.keep:
        for label, _, folders in loaded:
            for folder in folders:
                target = args.keep / label / (folder.name if len(folders) > 1 else "")
                target.mkdir(parents=True, exist_ok=True)
                for f in [folder / "results.json", *(sorted(folder.glob("grid_*.png")) if args.grids else [])]:
                    if not (target / f.name).exists() or not (target / f.name).samefile(f):  # an arm already kept
                        shutil.copy2(f, target / f.name)
        print(f"kept: {args.keep}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
