"""Hypernetwork training throughput against the toy UNet's own training step, same batch, same threads:
`python -m eval.bench_train [--stages 1 2 3] [--batch 16] [--threads 1] [--steps 30] [--hyper-dim 32 --rank 8]`.

A hypernetwork step is the trainer's own (`hyperlora.train.loop.Trainer.step`: a seeded batch from the
toy training pool, the stage's generated LoRAs applied per sample, the frozen base model as teacher for
cases (b) and (c), backward into the hypernetwork only, clipping, AdamW, the LR schedule) on the shipped
toy models; the UNet step is `eval/bench_unet.py`'s (`hyperlora.toy.unet.train_step`). Prints steps/s and
the ratio (the training issue's target: a hypernetwork step at most 1.3x a UNet step). Run it on an
otherwise idle machine: a second job on 2 cores changes the figures.
"""

from __future__ import annotations

import argparse
import tempfile
import time

from hyperlora.train.config import resolve
from hyperlora.train.loop import setup_stage

from .bench_unet import bench as bench_unet


def bench_stage(stage: int, *, batch: int, threads: int, steps: int, warmup: int = 3, cache_dir: str,
                model: dict | None = None) -> float:  # fmt: skip
    """Optimiser steps per second of `stage` on a 64-person toy pool (the cache is built once per cache_dir)."""
    run = {"batch_size": batch, "threads": threads, "num_identities": 64, "val_every": 0}
    config = resolve("toy", stage, model=model, run=run, stage_overrides={"steps": warmup + steps})
    trainer = setup_stage(config, cache_dir=cache_dir, progress=False)
    for step in range(warmup):
        trainer.step(step)
    start = time.perf_counter()
    for step in range(warmup, warmup + steps):
        trainer.step(step)
    return steps / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per measurement")
    parser.add_argument("--hyper-dim", type=int, default=None, help="K (default: the toy preset's)")
    parser.add_argument("--rank", type=int, default=None, help="ID-LoRA rank (default: the toy preset's)")
    args = parser.parse_args()
    model = {k: v for k, v in (("hyper_dim", args.hyper_dim), ("rank", args.rank)) if v is not None}
    unet = bench_unet(args.threads, args.steps, batch_size=args.batch)
    print(f"toy UNet training step, batch {args.batch}, {args.threads} thread(s): {unet:5.2f} steps/s")
    with tempfile.TemporaryDirectory() as cache:
        for stage in args.stages:
            rate = bench_stage(stage, batch=args.batch, threads=args.threads, steps=args.steps, cache_dir=cache,
                               model=model)  # fmt: skip
            print(f"hypernetwork stage {stage}: {rate:5.2f} steps/s, {unet / rate:4.2f}x a UNet step {model or ''}")


if __name__ == "__main__":
    main()
