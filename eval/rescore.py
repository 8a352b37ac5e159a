"""Score an evaluation run's saved images with the identity-trait reader, without generating them again.

    python -m eval.rescore RUN_DIR [RUN_DIR ...] [--trait-reader data/toy/traits]

For runs made before the trait reader existed (or with another reader): adds `trait_match` to every record of
RUN_DIR/records.jsonl (the run's own file is kept; the rescored records go to records_traits.jsonl) and prints, per
variant, the mean trait match and, where the run has `hyperlora` and `hyperlora_other`, the paired control gaps
of ID similarity and trait match (`eval.summary.control_gaps`). Toy runs only: the reader knows toy people's traits.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from .summary import control_gaps


def rescore(run_dir: str | Path, trait_reader: str | Path = "data/toy/traits") -> dict:
    """Trait match per record of one run; returns {"variants": {variant: mean}, "control_gap": {metric: gap}}."""
    from hyperlora.toy.trait_reader import TraitReader

    run = Path(run_dir)
    if json.loads((run / "config.json").read_text())["config"]["world"] != "toy":
        raise ValueError(f"{run}: only toy runs can be rescored with the trait reader (sdxl people have no traits)")
    reader = TraitReader.load(trait_reader)
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for identity in sorted({r["identity"] for r in records}):
        mine = [r for r in records if r["identity"] == identity]
        images = np.stack([np.asarray(Image.open(run / r["image"]).convert("RGB")) for r in mine])
        for record, match in zip(mine, reader.match(images, identity)):
            record["trait_match"] = float(match)
    with open(run / "records_traits.jsonl", "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    variants = {}
    for r in records:
        variants.setdefault(r["variant"], []).append(r["trait_match"])
    return {"variants": {k: float(np.mean(v)) for k, v in variants.items()}, "control_gap": control_gaps(records)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.rescore", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="evaluation run folders (python -m eval.run --out)")
    parser.add_argument("--trait-reader", default="data/toy/traits", help="trait reader folder")
    args = parser.parse_args(argv)
    for run in args.runs:
        result = rescore(run, args.trait_reader)
        print(json.dumps({"run": run, **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
