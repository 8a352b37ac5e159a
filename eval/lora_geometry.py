"""How big a generated ID-LoRA's update is and where it points, against LoRAs fine-tuned on the same person.

For each held-out person: the generated LoRA, a rank-r LoRA tuned from zero (`zero_ft`), the generated one tuned
(`hyperlora_ft`) and its coefficient tokens tuned over the frozen bases (`coef_ft`), all on the person's
references with the harness's recipe. Printed: the update's norm |dW| over every target linear (scale included)
and its cosine to the zero-tuned LoRA's update (per linear, averaged), and how far apart two people's generated
updates are against two people's tuned ones. A LoRA is defined up to an invertible r x r matrix between its down
and up factors; dW = B A is not, so both measures are on dW.

Then the coefficient tokens themselves (`coefficient_geometry`): how far tuning moved each person's tokens from the
generated ones, how alike different people's tokens are before and after, and how much of the tuning's correction
all people share. A shared correction is one offset the resampler could learn for everyone; a personal one is the
mapping from the person to their coefficients that it has not learned yet.

    python -m eval.lora_geometry --checkpoint runs/train/toy_v2_arc/snapshots/step-6500 --ids 0,1 --steps 300
    python -m eval.lora_geometry --checkpoint CKPT --ids 0,1,2,3 --coef-seeds 0,1 --coefficients-only --id-scale 2.5
"""

from __future__ import annotations

import argparse
import itertools

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from hyperlora.lora import LoRAWeights
from hyperlora.train.losses import coefficient_cosine


def update_norm(lora: LoRAWeights, index: int = 0) -> float:
    """|dW| over every adapted linear (Frobenius, the LoRA's alpha / r included)."""
    return float(sum(lora.delta(path, index).float().norm() ** 2 for path in lora.layers) ** 0.5)


def update_cosine(a: LoRAWeights, b: LoRAWeights) -> float:
    """The cosine between two LoRAs' updates, per linear, averaged over their shared linears."""
    cosines = []
    for path in a.layers.keys() & b.layers.keys():
        x, y = a.delta(path).float().flatten(), b.delta(path).float().flatten()
        cosines.append(float(x @ y / (x.norm() * y.norm()).clamp_min(1e-12)))
    return float(np.mean(cosines))


def update_distance(a: LoRAWeights, b: LoRAWeights) -> float:
    """|dW_a - dW_b| / |dW_a| over every shared linear."""
    paths = a.layers.keys() & b.layers.keys()
    diff = sum(float((a.delta(p).float() - b.delta(p).float()).norm() ** 2) for p in paths) ** 0.5
    return diff / max(update_norm(a), 1e-12)


def token_cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    """The cosine between two sets of coefficient tokens [..., Q, K], per token, averaged."""
    return float(F.cosine_similarity(a.flatten(0, -2).float(), b.flatten(0, -2).float(), dim=-1).mean())


def coefficient_geometry(generated: list[torch.Tensor], fitted: list[torch.Tensor]) -> dict[str, float]:
    """Per person i, the generated tokens g_i and the tuned tokens f_i (each [1, Q, K], two people or more).

    fitted_to_generated: token cosine of f_i to g_i (1: tuning left them); generated_between / fitted_between:
    token cosine between two people's tokens (1: everyone gets the same LoRA); correction_shared: the fraction of
    the corrections d_i = f_i - g_i that their mean carries, |mean d|^2 / mean |d|^2 (1: one correction for
    everyone; about 1 / n for unrelated ones); correction_between: token cosine between two people's corrections."""
    if len(generated) != len(fitted) or len(generated) < 2:
        raise ValueError(
            f"need the generated and tuned tokens of two people or more, got {len(generated)}, {len(fitted)}"
        )
    g, f = torch.stack([t.float().squeeze(0) for t in generated]), torch.stack([t.float().squeeze(0) for t in fitted])
    if g.shape != f.shape:
        raise ValueError(f"generated tokens {tuple(g.shape)} and tuned tokens {tuple(f.shape)} differ in shape")
    pairs, people = list(itertools.combinations(range(len(g)), 2)), torch.arange(len(g))
    d = f - g
    return {
        "fitted_to_generated": token_cosine(f, g),
        "generated_between": coefficient_cosine(g, people),  # the training log's val_coefficient_cosine
        "fitted_between": coefficient_cosine(f, people),
        "correction_shared": float(d.mean(0).pow(2).sum() / d.pow(2).sum(dim=(1, 2)).mean().clamp_min(1e-12)),
        "correction_between": float(np.mean([token_cosine(d[i], d[j]) for i, j in pairs])),
    }


def person_loras(method, identity: dict, steps: int, lr: float, coef_lr: float, id_scale: float, *,
                 coef_seeds: tuple[int, ...] = (0,), free: bool = True) -> dict:  # fmt: skip
    """{"generated", "zero_ft", "hyperlora_ft", "coef_ft"} LoRAs of one person (`method`: a HyperLoRAMethod), and
    under "tokens" the generated coefficient tokens and the tuned ones, one per seed ({"generated": [1, Q, K],
    "coef_ft": [[1, Q, K], ...]}).

    The coefficients are tuned once per seed of `coef_seeds` (batches, noise, timesteps), so that two tunings of one
    person say how much of the tokens' movement is the optimiser's noise; the "coef_ft" LoRA is the first seed's. `free=False` skips the two free LoRAs (zero_ft, hyperlora_ft)."""
    from hyperlora.coefficient_tune import CoefficientFinetuner, id_coefficients
    from hyperlora.finetune import (
        INSTANCE_PROMPT,
        FinetuneConfig,
        LoRAFinetuner,
        noise_scheduler,
        reference_batch,
        start_lora,
    )
    from hyperlora.pipeline import with_trigger

    personalized, pipe = method.personalized, method.world.pipe
    result = personalized.personalize([Image.fromarray(image) for image in identity["images"]], id_scale=id_scale)
    personalized.reset()  # tuning adds the LoRA through hooks, on the base weights
    prompt = with_trigger(INSTANCE_PROMPT, personalized.trigger_words)
    batch = reference_batch(pipe, list(identity["images"]), prompt, method.config.size)
    out = {"generated": result.loras["id"]}
    for init in ("zero", "hyperlora") if free else ():
        config = FinetuneConfig(lr=lr, init=init, scale=id_scale)
        tuner = LoRAFinetuner(pipe.unet, noise_scheduler(pipe), batch, start_lora(config, result.loras["id"]), config)
        tuner.train(steps, progress=False)
        out[f"{init}_ft"] = tuner.lora
    coefficients = id_coefficients(personalized.hyperlora, result.features)
    fitted = []
    for seed in coef_seeds:
        tuner = CoefficientFinetuner(pipe.unet, noise_scheduler(pipe), batch, personalized.hyperlora, coefficients,
                                     FinetuneConfig(lr=coef_lr, scale=id_scale, seed=seed))  # fmt: skip
        tuner.train(steps, progress=False)
        out.setdefault("coef_ft", tuner.lora)
        fitted.append(tuner.unit_coefficients.cpu())
    out["tokens"] = {"generated": coefficients.cpu(), "coef_ft": fitted}
    return out


def main(argv: list[str] | None = None) -> int:
    from .baselines import HyperLoRAMethod
    from .protocol import EvalConfig, ToyWorld

    parser = argparse.ArgumentParser(prog="python -m eval.lora_geometry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--ids", default="0,1", help="indices into the held-out test identities (two or more)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-3, help="zero_ft's and hyperlora_ft's")
    parser.add_argument("--coef-lr", type=float, default=1e-2)
    parser.add_argument("--id-scale", type=float, default=0.85)
    parser.add_argument(
        "--coef-seeds",
        default="0",
        help="tune the coefficients once per seed (two or more: the "
        "cosine between two tunings of one person, the optimiser's noise floor)",
    )
    parser.add_argument("--coefficients-only", action="store_true", help="skip the free LoRAs (zero_ft, hyperlora_ft)")
    parser.add_argument("--toy-dir", default="data/toy")
    args = parser.parse_args(argv)
    ids = [int(i) for i in args.ids.split(",")]
    coef_seeds = tuple(int(i) for i in args.coef_seeds.split(","))
    if len(ids) < 2:
        parser.error(f"--ids needs two people or more, got {args.ids!r}")
    config = EvalConfig(world="toy", methods="hyperlora", checkpoint=args.checkpoint, toy_dir=args.toy_dir,
                        num_identities=max(ids) + 1)  # fmt: skip
    world = ToyWorld(config)
    method = HyperLoRAMethod(config, world)
    people, tuned_tokens = {}, []
    for index in ids:
        identity = world.identity(index)
        people[identity["id"]] = loras = person_loras(method, identity, args.steps, args.lr, args.coef_lr,
                                                      args.id_scale, coef_seeds=coef_seeds,
                                                      free=not args.coefficients_only)  # fmt: skip
        tokens = loras.pop("tokens")
        repeat = tokens["coef_ft"]
        noise = (
            "" if len(repeat) < 2 else f", two tunings' cosine to each other {token_cosine(repeat[0], repeat[1]):.3f}"
        )
        print(
            f"person {identity['id']}: tuned tokens' cosine to the generated "
            f"{token_cosine(repeat[0], tokens['generated']):.3f}{noise}"
        )
        tuned_tokens.append(tokens)
        for name, lora in loras.items():
            cosine = f"   cosine to zero_ft {update_cosine(lora, loras['zero_ft']):+.3f}" if "zero_ft" in loras else ""
            print(f"  {name:<13} |dW| {update_norm(lora):7.3f}{cosine}")
    first, second = list(people.values())[:2]
    for name in ("generated", "zero_ft") if "zero_ft" in first else ("generated", "coef_ft"):
        print(f"two people's {name} updates: |dW_a - dW_b| / |dW_a| = {update_distance(first[name], second[name]):.3f}")
    geometry = coefficient_geometry([t["generated"] for t in tuned_tokens], [t["coef_ft"][0] for t in tuned_tokens])
    print("coefficient tokens: " + ", ".join(f"{key} {value:.3f}" for key, value in geometry.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
