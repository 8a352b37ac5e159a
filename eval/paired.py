"""Paired gaps across saved evaluation runs: every variant against one control on the same person, prompt and seed.

    python -m eval.paired "lr1e-2=runs/coef/coef_shipped" "lr3e-2=runs/coef/coef_lr3e-2" --control hyperlora

Each argument is LABEL=RUN (an `eval.run --out` folder). Runs of one protocol (same people, prompts and seeds) pair
image by image. Every variant is named "LABEL variant", so that two runs of one method (two learning rates, two
guidance scales) stay apart. `--control` names one of them ("g5 zero_ft@300"), or a bare variant ("hyperlora"),
which means that variant of the first run that has it. Prints, per variant, its mean over its images and its
difference to the control with the standard error over people (`eval.summary.paired_gap`).

    python -m eval.paired "g5=runs/coef/zero_g5" "g3=runs/coef/zero_g3" --control "g5 zero_ft@300"
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from .summary import load_records, paired_gap


def pooled_records(specs: list[str]) -> list[dict]:
    """LABEL=RUN arguments -> their records, each variant renamed "LABEL variant" (the bare name kept as `source`)."""
    records = []
    for spec in specs:
        label, sep, run = spec.partition("=")
        if not sep or not label or not run:
            raise SystemExit(f"a run is LABEL=FOLDER, got {spec!r}")
        if not (Path(run) / "records.jsonl").is_file():
            raise SystemExit(f"run {label!r}: no records.jsonl in {run!r} (run python -m eval.run --out {run} first)")
        records += [{**r, **look_keys(r), "variant": f"{label} {r['variant']}", "source": r["variant"]}
                    for r in load_records(run)]
    return records


def look_keys(record: dict) -> dict:
    """Per-image `adherence` and `leakage` where the attribute judge read the image (toy runs), so that the looks pair
    image by image like id_sim: the share of the prompt's named attributes drawn as named, and of those the prompt
    asked unlike the references' value, the share drawn as the references' (NaN when there is none). The summary's
    adherence_mean / leakage_mean weigh each attribute equally instead, so their means differ a little."""
    if "predicted" not in record:
        return {}
    predicted, asked, reference = record["predicted"], record["prompt_attributes"], record["reference_attributes"]
    drawn = [predicted.get(name) == value for name, value in asked.items()]
    eligible = [name for name, value in asked.items() if name in reference and reference[name] != value]
    copied = [predicted.get(name) == reference[name] for name in eligible]
    return {"adherence": float(np.mean(drawn)) if drawn else float("nan"),
            "leakage": float(np.mean(copied)) if copied else float("nan")}


CLIP_JUDGED = ("clip_t", "clip_i", "adherence", "leakage")  # per-image keys the judge CLIP reads (prefixes)


def judge_clip(run: str | Path) -> str:
    """The CLIP that judged a run's CLIP-T, CLIP-I and looks (runs from before `judge_clip` existed: the world's own)."""
    config = Path(run) / "config.json"
    values = json.loads(config.read_text()).get("config", {}) if config.is_file() else {}
    own = values.get("clip_path") if values.get("world") == "sdxl" else str(Path(values.get("toy_dir", "data/toy")) / "clip")
    return os.path.normpath(values.get("judge_clip") or own or "?")


def resolve_control(records: list[dict], control: str) -> str:
    """`control` when it is a pooled variant's name, else the first run's variant of that bare name."""
    for key in ("variant", "source"):
        match = next((r["variant"] for r in records if r[key] == control), None)
        if match is not None:
            return match
    raise SystemExit(f"no run has the control variant {control!r}")


def paired_table(records: list[dict], control: str, key: str = "id_sim") -> list[dict]:
    """One row per variant, in first-seen order: its mean `key` and its paired gap to `control` (None for it)."""
    table = []
    for variant in dict.fromkeys(r["variant"] for r in records):
        values = [r[key] for r in records if r["variant"] == variant and r.get(key) is not None and np.isfinite(r[key])]
        gap = paired_gap(records, variant, control, key) if variant != control else None
        table.append({"variant": variant, "n_images": len(values),
                      "mean": float(np.mean(values)) if values else float("nan"), "gap": gap})  # fmt: skip
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.paired", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("runs", nargs="+", help="LABEL=RUN folders of one protocol")
    parser.add_argument("--control", default="hyperlora", help="the variant every other one is paired to")
    parser.add_argument("--key", default="id_sim", help="per-image metric (id_sim, trait_match, clip_t, "
                        "lpips_preservation, ...; toy runs also adherence and leakage)")
    args = parser.parse_args(argv)
    records = pooled_records(args.runs)
    judges = {spec.partition("=")[0]: judge_clip(spec.partition("=")[2]) for spec in args.runs}
    if args.key.startswith(CLIP_JUDGED) and len(set(judges.values())) > 1:
        print(f"WARNING: {args.key} was judged by different CLIPs ({', '.join(f'{k}: {v}' for k, v in judges.items())}); "
              "its gaps mix two judges and are not comparable", file=sys.stderr)  # fmt: skip
    control = resolve_control(records, args.control)
    table = paired_table(records, control, args.key)
    print(f"| variant | images | {args.key} | paired to {control} (people above 0) |\n|---|---|---|---|")
    for row in table:
        gap, text = row["gap"], ""
        if gap is not None:
            sem = f" ± {gap['sem']:.3f}" if gap["sem"] is not None else ""
            text = f"{gap['mean']:+.3f}{sem} ({gap['identities_above_zero']} of {gap['n_identities']})"
        elif row["variant"] != control:
            text = "no image shared with the control"
        print(f"| {row['variant']} | {row['n_images']} | {row['mean']:.3f} | {text} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
