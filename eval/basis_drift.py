"""How far training moved a hypernetwork's basis banks: from their seeded initial values, or from another checkpoint.

A HyperLoRA's ID-LoRA can only be a combination of its K basis matrices per linear, so what the bases learned
bounds what any coefficients can make (`hyperlora/coefficient_tune.py` measures that bound on images). This is the
weight-space side: per bank (`id_down_basis`, `id_up_basis`, `base_down_basis`, `base_up_basis`), the relative
change |B - B_ref| / |B_ref| over every target linear, and both norms. Down bases start random
(init_std / sqrt(in)); a down bank at a relative change of 0.1 is still 99 % its random projection. Up bases start
at zero, so against the initial values their change is all they hold (printed as "from zero").

    python -m eval.basis_drift data/toy/hyperlora                      # against the seeded init of its config
    python -m eval.basis_drift runs/train/cont_b10/hyperlora --against data/toy/hyperlora

The seeded init is `HyperLoRA(config, targets)` right after `set_seed(seed)`, as `hyperlora.train` builds a run
from scratch (`--seed`, the run's, recorded in config.json `run_config`): it is that run's start only for a
schedule that began from scratch with that seed (a branch run `--init`'ed from it inherits those bases).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from hyperlora.checkpoint import load_checkpoint
from hyperlora.hypernet import HyperLoRA

BANKS = ("id_down_basis", "id_up_basis", "base_down_basis", "base_up_basis")


def seeded_init(model: HyperLoRA, seed: int) -> HyperLoRA:
    """The hypernetwork `hyperlora.train` builds from scratch for `model`'s config and targets under `seed`."""
    from accelerate.utils import set_seed

    set_seed(seed)
    return HyperLoRA(model.config, model.targets)


def bank_drift(model: HyperLoRA, reference: HyperLoRA) -> dict[str, dict[str, float]]:
    """{bank: {"change", "norm", "reference_norm"}} over every target linear; "change" is relative to the
    reference's norm (None where the reference bank is zero: the change is then the bank's own norm)."""
    ours, theirs = dict(model.named_parameters()), dict(reference.named_parameters())
    if ours.keys() != theirs.keys() or any(ours[k].shape != theirs[k].shape for k in ours):
        raise ValueError("the two hypernetworks differ in layout (K, rank, targets): their bases cannot be compared")
    sums: dict[str, list[float]] = {}
    for name, value in ours.items():
        bank = name.rsplit(".", 1)[-1]
        if bank in BANKS:
            sums.setdefault(bank, [0.0, 0.0, 0.0])
            ref = theirs[name].detach().float()
            value = value.detach().float()
            sums[bank][0] += float((value - ref).pow(2).sum())
            sums[bank][1] += float(value.pow(2).sum())
            sums[bank][2] += float(ref.pow(2).sum())
    result = {}
    for bank, (diff, norm, ref_norm) in sums.items():  # a bank the configuration lacks (no Base-LoRA) is absent
        change = (diff / ref_norm) ** 0.5 if ref_norm > 0 else None
        result[bank] = {"change": change, "norm": norm**0.5, "reference_norm": ref_norm**0.5}
    return result


def _seed_of(folder: Path) -> int:
    config = folder / "config.json"
    record = json.loads(config.read_text()) if config.is_file() else {}
    seed = record.get("run_config", {}).get("run", {}).get("seed")
    if seed is None:
        raise ValueError(f"{folder}: config.json records no run seed (run_config.run.seed): pass --against FOLDER")
    return int(seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m eval.basis_drift", description=__doc__.split("\n\n")[0])
    parser.add_argument("checkpoints", nargs="+", help="HyperLoRA folders")
    parser.add_argument("--against", default="init",
                        help="'init' (each checkpoint's seeded initial values, default) or a HyperLoRA folder")  # fmt: skip
    args = parser.parse_args(argv)
    reference = None if args.against == "init" else load_checkpoint(args.against, dtype=torch.float32)
    print(f"| checkpoint | against | {' | '.join(BANKS)} |")
    print("|---|---|" + "---|" * len(BANKS))
    for folder in map(Path, args.checkpoints):
        model = load_checkpoint(folder, dtype=torch.float32)
        ref = reference if reference is not None else seeded_init(model, _seed_of(folder))
        drift = bank_drift(model, ref)
        cells = []
        for bank in BANKS:
            d = drift.get(bank)
            if d is None:
                cells.append("-")
            elif d["change"] is None:
                cells.append(f"from zero, norm {d['norm']:.2f}")
            else:
                cells.append(f"{d['change']:.3f} (norm {d['reference_norm']:.1f} -> {d['norm']:.1f})")
        print(f"| {folder} | {args.against} | {' | '.join(cells)} |")


if __name__ == "__main__":
    main()
