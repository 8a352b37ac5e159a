r"""`python -m hyperlora.train.grow CKPT --hyper-dim K [--rank R] --out DIR`: widen a trained hypernetwork's bases.

A branch of a trained checkpoint with more basis matrices per layer (K) or a higher LoRA rank, that starts
where the checkpoint is: every trained tensor is copied into its slice of the wider one, and what is new
starts as a fresh run would (down bases random, up bases zero), so the new bases add nothing until they
train. Continue it with `python -m hyperlora.train --stage 3 --init DIR --hyper-dim K ...`.

Growing K also widens each resampler's output projection. Its new rows start small but not zero
(`new_row_scale` of the trained rows' spread): a coefficient that is exactly zero on an up basis that is exactly
zero gives neither of them a gradient, and the new bases would never train. The generated LoRAs then move by a
few times that fraction, through the new down bases (printed). Growing the rank needs no such nudge: a new down
column is random, so its up row gets a gradient at once.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import torch

from ..checkpoint import load_checkpoint, save_checkpoint
from ..hypernet import HyperLoRA


@torch.no_grad()
def grow(model: HyperLoRA, *, hyper_dim: int | None = None, rank: int | None = None, seed: int = 0,
         new_row_scale: float = 0.01) -> HyperLoRA:  # fmt: skip
    """A copy of `model` with `hyper_dim` basis matrices per layer and LoRA rank `rank` (None: unchanged)."""
    old = model.config
    hyper_dim = old.hyper_dim if hyper_dim is None else hyper_dim
    rank = old.rank if rank is None else rank
    if hyper_dim < old.hyper_dim or rank < old.rank:
        raise ValueError(f"grow only widens: K {old.hyper_dim} -> {hyper_dim}, rank {old.rank} -> {rank}")
    if hyper_dim == old.hyper_dim and rank == old.rank:
        raise ValueError(f"nothing to grow: the checkpoint already has K {hyper_dim} and rank {rank}")
    if not 0 <= new_row_scale < 1:
        raise ValueError(f"new_row_scale must be in [0, 1), got {new_row_scale}")
    config = dataclasses.replace(old, hyper_dim=hyper_dim, rank=rank)
    with torch.random.fork_rng():  # seeded without touching the caller's RNG
        torch.manual_seed(seed)
        wide = HyperLoRA(config, model.targets)  # fresh: random down bases, zero up bases
    source = model.state_dict()
    generator = torch.Generator().manual_seed(seed)
    for name, target in wide.state_dict().items():
        trained = source[name].to(target.dtype)
        if trained.shape == target.shape:
            target.copy_(trained)
            continue
        if name.endswith("proj_out.weight"):  # [K, dim]: trained rows, then small random ones
            target.copy_(torch.randn(target.shape, generator=generator) * trained.std() * new_row_scale)
        elif name.endswith("proj_out.bias"):
            target.zero_()
        elif "_basis" not in name:
            raise ValueError(f"{name}: shape {tuple(trained.shape)} -> {tuple(target.shape)}, which grow does not know")
        target[tuple(slice(0, n) for n in trained.shape)] = trained
    return wide


@torch.no_grad()
def lora_change(before: HyperLoRA, after: HyperLoRA, features: dict) -> float:
    """Largest relative change of a generated LoRA update (up @ down, every branch) between two models on the same features."""
    worst = 0.0
    a, b = before.generate(**features), after.generate(**features)
    for branch, weights in a.items():
        for path in weights.layers:
            for i in range(weights.batch_size):
                delta_a, delta_b = weights.delta(path, i), b[branch].delta(path, i)
                worst = max(worst, float((delta_b - delta_a).norm() / delta_a.norm().clamp_min(1e-12)))
    return worst


def _random_features(model: HyperLoRA, n: int = 2) -> dict:
    """Random ArcFace embeddings and CLIP tokens (both branches) to compare two models' generated LoRAs on."""
    generator = torch.Generator().manual_seed(0)
    config = model.config
    features = {"clip": torch.randn(n, 16, config.dim, generator=generator)}
    if "arcface" in config.encoder_types:
        arcface = torch.randn(n, config.id_embed_dim, generator=generator)
        features["arcface"] = torch.nn.functional.normalize(arcface, dim=-1)
    if config.has_base_lora:
        features["clip_blurred"] = torch.randn(n, 16, config.dim, generator=generator)
    return features


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m hyperlora.train.grow", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("checkpoint", help="a trained checkpoint folder (a stage's model/ or a shipped one)")
    p.add_argument("--hyper-dim", type=int, default=None, help="basis matrices per layer (K)")
    p.add_argument("--rank", type=int, default=None, help="ID-LoRA rank (the Base-LoRA's is half)")
    p.add_argument("--seed", type=int, default=0, help="for the new bases and projection rows")
    p.add_argument("--new-row-scale", type=float, default=0.01, help="new rows' spread / trained rows'")
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    model = load_checkpoint(args.checkpoint, dtype=torch.float32)
    try:
        wide = grow(model, hyper_dim=args.hyper_dim, rank=args.rank, seed=args.seed, new_row_scale=args.new_row_scale)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    extra = {"grown_from": str(args.checkpoint), "grow": {k: v for k, v in vars(args).items() if k != "checkpoint"}}
    out = save_checkpoint(wide, Path(args.out), extra=extra)
    print(f"{args.checkpoint}: K {model.config.hyper_dim} -> {wide.config.hyper_dim}, "
          f"rank {model.config.rank} -> {wide.config.rank}; written to {out}")  # fmt: skip
    features = _random_features(model)
    print(f"generated LoRAs on random features move by at most {lora_change(model, wide, features):.2e} (relative)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
