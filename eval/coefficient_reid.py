r"""Do a hypernetwork's coefficients know who is who? Re-identification of held-out people from them.

    python -m eval.coefficient_reid [--checkpoint DIR] [--people 64]

For each of the first `people` held-out ('test') toy identities, two disjoint pairs of renders (looks 0-1 and 2-3,
so clothes, hair and background differ) go through the conditioner and the hypernetwork; the ID coefficient tokens
of each pair, flattened and unit-normalised, are matched to every person's other pair by cosine. Top-1 is the share
of people whose own other pair is the nearest (chance: 1 / people). This reads the resampler alone: whether the
identity reaches the images is the harness's question (`eval.run`), and the bases' reach `coef_ft`'s.
"""

from __future__ import annotations

import argparse
import sys

import torch


@torch.no_grad()
def coefficient_matrix(pipe, identities: list[int], looks: list[int], seed: int = 7) -> torch.Tensor:
    """[people, Q * K] unit ID coefficients, one row per person, from the renders `looks` of each."""
    from hyperlora.coefficient_tune import id_coefficients
    from hyperlora.toy.render import render_sample

    rows = []
    for identity in identities:
        images = [render_sample(identity, k, seed=seed).image for k in looks]
        tokens = id_coefficients(pipe.hyperlora, pipe.conditioner(images))
        rows.append(torch.nn.functional.normalize(tokens.flatten().float(), dim=0))
    return torch.stack(rows)


def reidentification(pipe, identities: list[int], seed: int = 7) -> dict:
    """Top-1 re-identification and the mean same- and different-person cosines between two pairs of photos."""
    if len(identities) < 2:
        raise ValueError(f"re-identification needs at least 2 people, got {len(identities)}")
    similarity = (
        coefficient_matrix(pipe, identities, [0, 1], seed) @ coefficient_matrix(pipe, identities, [2, 3], seed).T
    )
    eye = torch.eye(len(identities), dtype=torch.bool)
    return {"people": len(identities), "top1": (similarity.argmax(1) == torch.arange(len(identities))).float().mean().item(),
            "chance": 1 / len(identities), "same_cosine": similarity.diag().mean().item(),
            "different_cosine": similarity[~eye].mean().item(), "similarity": similarity}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.coefficient_reid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", default="", help="a toy HyperLoRA folder; default: data/toy/hyperlora")
    parser.add_argument("--people", type=int, default=64, help="held-out people (the first n of the 'test' split)")
    parser.add_argument("--seed", type=int, default=7, help="the renders' seed")
    args = parser.parse_args(argv)
    from hyperlora.pipeline import HyperLoRAPipeline
    from hyperlora.toy.render import split_identities
    from hyperlora.worlds.toy import MissingCheckpointError

    try:
        pipe = HyperLoRAPipeline.from_pretrained("toy", checkpoint=args.checkpoint or None)
        result = reidentification(pipe, split_identities("test")[: args.people], args.seed)
    except (MissingCheckpointError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(pipe.label)
    print(f"{result['people']} held-out people: top-1 {result['top1']:.3f} (chance {result['chance']:.3f}); "
          f"cosine same person {result['same_cosine']:.4f}, different people {result['different_cosine']:.4f}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
