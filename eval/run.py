r"""`python -m eval.run --world toy|sdxl --method hyperlora,base,renders --out runs/eval/NAME [--smoke]`: one run.

Flags are the fields of `eval.protocol.EvalConfig`; the run folder gets config.json (with this
command line and the git commit), records.jsonl, summary.json/.csv and the grids. Without
--checkpoint, method hyperlora scores a freshly initialised, UNTRAINED hypernetwork, and says so.
--smoke sets tiny sizes (1 identity, prompts 0 and 1, 2 seeds, 2 steps, DreamBooth at 1 and 2 steps) unless
flags set them; with smoke-built toy models also pass --det-threshold 0 --min-face-size 0.

The toy world reads its models from --toy-dir. The sdxl world (eval/sdxl_world.py) reads local folders only:
--sdxl-path (a diffusers SDXL pipeline), --clip-path (CLIP ViT-L/14 with its tokenizer: the hypernetwork's
image encoder and the CLIP-T/-I judge) and --references (DIR/<name>/*.jpg, one folder per person, sorted: the
first --num-references photos are the references, the rest are held out and scored by method renders as the
ceiling). --face-backend conditions HyperLoRA (antelopev2, as the release, needs --insightface-root);
--judge-backend scores ID similarity and should be another backend (dlib). With --size left at 64 the images
have the pipeline's own size (1024 px for SDXL). Look leakage and adherence need ground truth: sdxl reports
them as None. Random stand-in weights (not SDXL's UNet or not ViT-L/14) label every row as plumbing.
    python -m eval.run --world sdxl --method hyperlora,base,renders --sdxl-path models/sdxl \
        --clip-path models/clip-vit-large-patch14 --checkpoint models/sdxl_hyper_id_lora_v1_fidelity \
        --references data/refs --face-backend antelopev2 --insightface-root models/insightface \
        --judge-backend dlib --num-identities 8 --out runs/eval/sdxl
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
            kind = {"int": int, "float": float, "float | None": float}.get(field.type, str)
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
