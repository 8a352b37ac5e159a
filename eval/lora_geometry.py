"""How big a generated ID-LoRA's update is and where it points, against LoRAs fine-tuned on the same person.

For each held-out person: the generated LoRA, a rank-r LoRA tuned from zero (`zero_ft`), the generated one tuned
(`hyperlora_ft`) and its coefficient tokens tuned over the frozen bases (`coef_ft`), all on the person's
references with the harness's recipe. Printed: the update's norm |dW| over every target linear (scale included)
and its cosine to the zero-tuned LoRA's update (per linear, averaged), and how far apart two people's generated
updates are against two people's tuned ones. A LoRA is defined up to an invertible r x r matrix between its down
and up factors; dW = B A is not, so both measures are on dW.

    python -m eval.lora_geometry --checkpoint runs/train/toy_v2_arc/snapshots/step-6500 --ids 0,1 --steps 300
"""

from __future__ import annotations

import argparse

import numpy as np
from PIL import Image

from hyperlora.lora import LoRAWeights


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


def person_loras(method, identity: dict, steps: int, lr: float, coef_lr: float, id_scale: float) -> dict:
    """{"generated", "zero_ft", "hyperlora_ft", "coef_ft"} LoRAs of one person (`method`: a HyperLoRAMethod)."""
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
    for init in ("zero", "hyperlora"):
        config = FinetuneConfig(lr=lr, init=init, scale=id_scale)
        tuner = LoRAFinetuner(pipe.unet, noise_scheduler(pipe), batch, start_lora(config, result.loras["id"]), config)
        tuner.train(steps, progress=False)
        out[f"{init}_ft"] = tuner.lora
    coefficients = id_coefficients(personalized.hyperlora, result.features)
    tuner = CoefficientFinetuner(pipe.unet, noise_scheduler(pipe), batch, personalized.hyperlora, coefficients,
                                 FinetuneConfig(lr=coef_lr, scale=id_scale))  # fmt: skip
    tuner.train(steps, progress=False)
    out["coef_ft"] = tuner.lora
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
    parser.add_argument("--toy-dir", default="data/toy")
    args = parser.parse_args(argv)
    ids = [int(i) for i in args.ids.split(",")]
    config = EvalConfig(world="toy", methods="hyperlora", checkpoint=args.checkpoint, toy_dir=args.toy_dir,
                        num_identities=max(ids) + 1)  # fmt: skip
    world = ToyWorld(config)
    method = HyperLoRAMethod(config, world)
    people = {}
    for index in ids:
        identity = world.identity(index)
        people[identity["id"]] = loras = person_loras(method, identity, args.steps, args.lr, args.coef_lr, args.id_scale)
        print(f"person {identity['id']}")
        for name, lora in loras.items():
            print(f"  {name:<13} |dW| {update_norm(lora):7.3f}   cosine to zero_ft {update_cosine(lora, loras['zero_ft']):+.3f}")
    first, second = list(people.values())[:2]
    for name in ("generated", "zero_ft"):
        print(f"two people's {name} updates: |dW_a - dW_b| / |dW_a| = {update_distance(first[name], second[name]):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
