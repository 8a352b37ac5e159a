r"""`python -m hyperlora.train.snapshot STAGE_DIR [--step N] [--out DIR]`: a checkpoint of a running (or finished)
stage as a HyperLoRA folder, so it can be scored while the stage trains on.

A stage keeps its newest resumable checkpoints (`checkpoints/step-N`: accelerate's state of the trained
`LoRAGenerator`, every hypernetwork parameter, frozen ones included). This writes step N's weights in the official
layout (`hyperlora.checkpoint.save_checkpoint`, float16 unless `--dtype`) to DIR (default
`STAGE_DIR/snapshots/step-N`), with the stage's config, the step and the git commit in its config.json; the folder
loads with `load_checkpoint` and `python -m eval.run --checkpoint DIR`. It reads the checkpoint only: a stage still
training is not disturbed. With an EMA (`--ema-decay` > 0) the snapshot holds the raw weights, not the EMA's.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file

from ..checkpoint import save_checkpoint
from ..hypernet import HyperLoRA
from ..targets import find_targets
from ..toy.cards import git_commit
from .config import RunConfig
from .resume import STEP_FILE, latest_checkpoint

WEIGHTS = "model.safetensors"  # accelerate's file for the first prepared model
PREFIX = "hyperlora."  # LoRAGenerator's attribute


def stage_config(stage_dir: Path) -> RunConfig:
    record = json.loads((stage_dir / "config.json").read_text())
    return RunConfig.from_dict({k: record[k] for k in ("model", "run", "stage")})


def checkpoint_folder(stage_dir: Path, step: int | None) -> tuple[Path, int]:
    """Step N's complete checkpoint folder (the newest when `step` is None), with a clear error if it is gone."""
    if step is None:
        latest = latest_checkpoint(stage_dir)
        if latest is None:
            raise FileNotFoundError(f"{stage_dir}: no complete checkpoint in checkpoints/ yet")
        return latest
    folder = stage_dir / "checkpoints" / f"step-{step}"
    if not (folder / STEP_FILE).is_file():
        kept = sorted(p.name for p in (stage_dir / "checkpoints").glob("step-*"))
        raise FileNotFoundError(f"{folder}: no complete checkpoint at step {step}; kept: {kept}")
    return folder, step


def snapshot(stage_dir: str | Path, step: int | None = None, out: str | Path | None = None, *,
             dtype: str = "float16") -> Path:  # fmt: skip
    """Write a stage's checkpoint at `step` (default: its newest) as a HyperLoRA folder; returns the folder."""
    stage_dir = Path(stage_dir)
    config = stage_config(stage_dir)
    folder, step = checkpoint_folder(stage_dir, step)
    state = {k.removeprefix(PREFIX): v for k, v in load_file(str(folder / WEIGHTS)).items()}
    unet_config = UNet2DConditionModel.load_config(Path(config.run.pipeline) / "unet")
    with init_empty_weights():  # only the target modules' names and shapes are needed
        unet = UNet2DConditionModel.from_config(unet_config)
    model = HyperLoRA(config.model, find_targets(unet))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"{folder / WEIGHTS} does not match the stage's hypernetwork: missing {missing[:5]}, "
                         f"unexpected {unexpected[:5]}")  # fmt: skip
    out = Path(out) if out else stage_dir / "snapshots" / f"step-{step}"
    extra = {"run_config": config.to_dict(), "git_commit": git_commit(), "stage": config.stage.stage, "steps": step,
             "snapshot_of": str(folder)}  # fmt: skip
    return save_checkpoint(model, out, dtype=getattr(torch, dtype), extra=extra)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train.snapshot", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("stage_dir", help="a stage's run folder (holding config.json and checkpoints/)")
    p.add_argument("--step", type=int, default=None, help="the checkpoint's step (default: the newest)")
    p.add_argument("--out", default=None, help="default: STAGE_DIR/snapshots/step-N")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = p.parse_args(argv)
    try:
        out = snapshot(args.stage_dir, args.step, args.out, dtype=args.dtype)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
