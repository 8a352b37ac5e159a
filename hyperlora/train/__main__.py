r"""`python -m hyperlora.train --preset toy --stages 1,2,3 --out runs/train/NAME [--resume]`: train HyperLoRA.

One loop, three stages (facts §5.2): 1 the Base-LoRA from face-blurred images; 2 the ID-LoRA from CLIP
features of the masked face; 3 the ID-LoRA's ArcFace path with the CLIP path frozen. `--stage N` runs one
stage (`--init` the previous stage's `model/` folder); `--stages 1,2,3` runs them in order, each starting
from the one before, in NAME/stage{N}/. A preset may name phases, "N-label", that run stage N in other
settings (`--stages 1,3,3-path` runs stage 3 twice, the second time in NAME/stage3-path/); without --stage
and --stages the preset's "schedule" runs (toy_fast: `python -m hyperlora.train --preset toy_fast --out DIR`). Flags are the fields of HyperLoRAConfig (the hypernetwork),
TrainConfig (the run) and StageConfig (given once, they apply to every stage run); the preset
(hyperlora/train/presets/*.json) fills the rest. An interrupted run continues with the same command and
--resume. Several processes: `accelerate launch --multi_gpu --num_processes N -m hyperlora.train ...` (on CPUs
also set ACCELERATE_USE_CPU=1: the processes then reduce gradients over gloo).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from ..config import HyperLoRAConfig
from .config import StageConfig, TrainConfig, list_train_presets, preset_schedule, resolve
from .loop import train_schedule

SECTIONS = {"model": HyperLoRAConfig, "run": TrainConfig, "stage": StageConfig}
SKIP = {"stage"}  # StageConfig.stage comes from --stage / --stages


def _kind(cls, field):
    hint = typing.get_type_hints(cls)[field.name]
    if hint is bool:
        return lambda v: v.lower() in ("1", "true", "yes")
    if typing.get_origin(hint) is tuple:
        inner = typing.get_args(hint)[0]
        return lambda v: tuple(inner(x) for x in v.split(",") if x)
    if hint in (int, float, str):
        return hint
    if float in typing.get_args(hint):  # float | None
        return lambda v: None if v.lower() == "none" else float(v)
    return str


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--preset", default="toy",
                   help=f"a shipped preset ({', '.join(list_train_presets())}) or your own preset's .json file")  # fmt: skip
    which = p.add_mutually_exclusive_group()  # neither: the preset's "schedule" (the paper's 1,2,3)
    which.add_argument("--stage", help="a stage (1, 2, 3) or a preset's phase (e.g. 3-path)")
    which.add_argument("--stages", type=lambda v: [s for s in v.split(",") if s], help="e.g. 1,2,3 or 1,3,3-path")
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--init", default=None, help="start from this checkpoint folder (e.g. a stage's model/)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its newest checkpoint")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    seen = set()
    for section, cls in SECTIONS.items():
        for field in dataclasses.fields(cls):
            if field.name in SKIP:
                continue
            if field.name in seen:
                raise RuntimeError(f"flag --{field.name} is a field of two configs")
            seen.add(field.name)
            p.add_argument("--" + field.name.replace("_", "-"), dest=f"{section}.{field.name}", type=_kind(cls, field),
                           default=None, help=f"{section}; default {field.default!r} or the preset's")  # fmt: skip
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "prepare":  # the sdxl world's folder dataset -> a training set
        from .folder import main as prepare_main

        return prepare_main(argv[1:])
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per saved file otherwise
    given = {section: {k.split(".", 1)[1]: v for k, v in vars(args).items() if k.startswith(section + ".") and v is not None}
             for section in SECTIONS}  # fmt: skip
    try:
        stages = args.stages or ([args.stage] if args.stage is not None else preset_schedule(args.preset))
        if len(set(stages)) < len(stages):
            raise ValueError(f"--stages {','.join(stages)} runs a phase twice; label the second (e.g. 3-path)")
        configs = [resolve(args.preset, s, model=given["model"], run=given["run"], stage_overrides=given["stage"])
                   for s in stages]  # fmt: skip
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.stage is not None:
        from .loop import train_stage

        path = train_stage(configs[0], args.out, init=args.init, resume=args.resume, progress=not args.quiet,
                           command=sys.argv)  # fmt: skip
    else:
        path = train_schedule(configs, args.out, init=args.init, resume=args.resume, progress=not args.quiet,
                              command=sys.argv, phases=stages)  # fmt: skip
    if os.environ.get("RANK", "0") == "0":  # one line, not one per process
        print(f"trained hypernetwork: {path} (float32); users load the export beside it: {path.parent / 'hyperlora'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
