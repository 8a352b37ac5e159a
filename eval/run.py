"""`python -m eval.run --world toy --method hyperlora,base,renders --out runs/eval/NAME [--smoke]`: one evaluation run.

Flags are the fields of `eval.protocol.EvalConfig`; the run folder gets config.json (with this
command line and the git commit), records.jsonl, summary.json/.csv and the grids. Without
--checkpoint, method hyperlora scores a freshly initialised, UNTRAINED hypernetwork, and says so.
--smoke sets tiny sizes (1 identity, prompts 0 and 1, 2 seeds, 2 steps, DreamBooth at 1 and 2 steps) unless
flags set them; with smoke-built toy models also pass --det-threshold 0 --min-face-size 0.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from .protocol import EvalConfig, format_table, run_evaluation

# --smoke: tiny sizes (plumbing) unless a flag sets them explicitly.
SMOKE = dict(num_identities=1, seeds_per_prompt=2, prompts="0,1", steps=2, dreambooth_steps="1,2")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="run folder")
    for field in dataclasses.fields(EvalConfig):
        flags = ["--" + field.name.replace("_", "-")] + (["--method"] if field.name == "methods" else [])
        if field.type == "bool":
            p.add_argument(*flags, dest=field.name, action="store_true", default=None)
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            p.add_argument(*flags, dest=field.name, type=kind, default=None, help=f"default: {field.default!r}")
    return p


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(EvalConfig) if getattr(args, f.name) is not None}
    defaults = SMOKE if given.get("smoke") else {}
    return EvalConfig(**{**defaults, **given})


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    config = config_from_args(args)
    summary = run_evaluation(config, args.out)
    print(summary["label"])
    print(format_table(summary["rows"]))
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
