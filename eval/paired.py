"""Paired gaps across saved evaluation runs: every variant against one control on the same person, prompt and seed.

    python -m eval.paired "lr1e-2=runs/coef/coef_shipped" "free=runs/coef/zero_shipped" --control hyperlora

Each argument is LABEL=RUN (an `eval.run --out` folder). Runs of one protocol (same people, prompts and seeds) pair
image by image; the control variant is taken from the first run that has it, and every other variant is named
"LABEL variant" so that two runs of one method (two learning rates) stay apart. Prints, per variant, its mean over
its images and its difference to the control with the standard error over people (`eval.summary.paired_gap`).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from .summary import load_records, paired_gap


def pooled_records(specs: list[str], control: str) -> list[dict]:
    """LABEL=RUN arguments -> their records, variants renamed "LABEL variant", the control kept from the first run."""
    records, have_control = [], False
    for spec in specs:
        label, sep, run = spec.partition("=")
        if not sep or not label or not run:
            raise SystemExit(f"a run is LABEL=FOLDER, got {spec!r}")
        if not (Path(run) / "records.jsonl").is_file():
            raise SystemExit(f"run {label!r}: no records.jsonl in {run!r} (run python -m eval.run --out {run} first)")
        rows = load_records(run)
        for r in rows:
            if r["variant"] != control:
                records.append({**r, "variant": f"{label} {r['variant']}"})
            elif not have_control:
                records.append(r)
        have_control = have_control or any(r["variant"] == control for r in rows)
    if not have_control:
        raise SystemExit(f"no run has the control variant {control!r}")
    return records


def paired_table(records: list[dict], control: str, key: str = "id_sim") -> list[dict]:
    """One row per variant, in first-seen order: its mean `key` and its paired gap to `control` (None for it)."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        values = [r[key] for r in records if r["variant"] == variant and r.get(key) is not None]
        gap = paired_gap(records, variant, control, key) if variant != control else None
        table.append({"variant": variant, "n_images": len(values),
                      "mean": float(np.mean(values)) if values else float("nan"), "gap": gap})  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.paired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="+", help="LABEL=RUN folders of one protocol")
    parser.add_argument("--control", default="hyperlora", help="the variant every other one is paired to")
    parser.add_argument("--key", default="id_sim", help="per-image metric (id_sim, trait_match, clip_t, ...)")
    args = parser.parse_args(argv)
    table = paired_table(pooled_records(args.runs, args.control), args.control, args.key)
    print(f"| variant | images | {args.key} | paired to {args.control} (people above 0) |\n|---|---|---|---|")
    for row in table:
        gap, text = row["gap"], ""
        if gap is not None:
            sem = f" ± {gap['sem']:.3f}" if gap["sem"] is not None else ""
            text = f"{gap['mean']:+.3f}{sem} ({gap['identities_above_zero']} of {gap['n_identities']})"
        elif row["variant"] != args.control:
            text = "no image shared with the control"
        print(f"| {row['variant']} | {row['n_images']} | {row['mean']:.3f} | {text} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
