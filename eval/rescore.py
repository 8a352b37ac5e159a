"""Score an evaluation run's saved images with the identity-trait reader, without generating them again.

    python -m eval.rescore RUN_DIR [RUN_DIR ...] [--trait-reader data/toy/traits]
    python -m eval.rescore --face-texture RUN_DIR [RUN_DIR ...]

For runs made before the trait reader existed (or with another reader): adds `trait_match` to every record of
RUN_DIR/records.jsonl (the run's own file is kept; the rescored records go to records_traits.jsonl) and prints, per
variant, the mean trait match and, where the run has `hyperlora` and `hyperlora_other`, the paired control gaps
of ID similarity and trait match (`eval.summary.control_gaps`). Toy runs only: the reader knows toy people's traits.

`--face-texture` adds `eval.metrics.face_texture` (face box from the toy judge's detector) to every record of a run
scored before the harness kept it, in RUN_DIR/records.jsonl itself: the key is added, no other value changes. Toy
runs only, because an sdxl run's detector is antelopev2 at the user's path; sdxl runs score it as they are made.
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


def add_face_texture(run_dir: str | Path, faces: str | Path = "data/toy/faces") -> dict:
    """Adds face_texture to the records of one toy run that lack it; returns {variant: mean face_texture}."""
    from hyperlora.toy.face_backend import ToyFaceAnalyzer

    from .metrics import face_texture
    from .protocol import face_box_mask

    run = Path(run_dir)
    if json.loads((run / "config.json").read_text())["config"]["world"] != "toy":
        raise ValueError(f"{run}: only toy runs are backfilled here (sdxl runs score face_texture as they are made)")
    analyzer = ToyFaceAnalyzer(model_dir=faces)
    records = [json.loads(line) for line in (run / "records.jsonl").read_text().splitlines()]
    for record in records:
        if "face_texture" in record:
            continue
        image = np.asarray(Image.open(run / record["image"]).convert("RGB"))
        mask = face_box_mask(analyzer, image)  # as the harness; no face: NaN (the harness falls back to a mean box)
        if mask is None:
            mask = np.zeros(image.shape[:2], dtype=bool)
        record["face_texture"] = float(face_texture(image[None], mask[None])["per_image"][0])
    (run / "records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    variants = {}
    for r in records:
        variants.setdefault(r["variant"], []).append(r["face_texture"])
    return {k: float(np.nanmean(v)) for k, v in variants.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.rescore", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="evaluation run folders (python -m eval.run --out)")
    parser.add_argument("--trait-reader", default="data/toy/traits", help="trait reader folder")
    parser.add_argument("--face-texture", action="store_true", help="add face_texture to the records instead")
    args = parser.parse_args(argv)
    for run in args.runs:
        if args.face_texture:
            print(json.dumps({"run": run, "face_texture": add_face_texture(run)}, indent=2))
            continue
        result = rescore(run, args.trait_reader)
        print(json.dumps({"run": run, **result}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
