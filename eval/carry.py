"""Check 0 of issue 17: can the toy base model carry a person, and through which of its parameters?

Fine-tunes one part of the UNet on one held-out person's references, DreamBooth-style ("sks, a portrait
of a person", the harness's data path), then generates the evaluation prompts with "sks, " in front and
scores ID similarity exactly as `eval.run` does. A HyperLoRA only adapts the attention linears, so it cannot
beat a fine-tune of those linears at full rank; if that stays low, the base model is the link to fix.

    python -m eval.carry --train targets --steps 300,1000 --ids 0,2 --out runs/carry/targets
    python -m eval.carry --train lora --rank 4 --lr 1e-3 ...       # the harness's DreamBooth LoRA
    python -m eval.carry --train resnets --unet runs/unet_more/unet  # another UNet in the same toy pipeline
    python -m eval.carry --train lora --varied-looks ...   # references in looks of their own, not one shared look
    python -m eval.carry --guidance 3.5,5,7.5 ...   # score each step count at several guidance scales (one training)

`--train`: lora | targets (HyperLoRA's target linears, full rank) | attentions (whole transformer blocks)
| resnets | all | any regex over UNet parameter names. Writes results.json and one grid per person
(references | generations after each step count and guidance scale, the first row the untouched base model).
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import metrics
from .baselines import ADAPTER, DREAMBOOTH_TARGETS, DREAMBOOTH_TOKEN, DreamBooth, remove_adapter
from .protocol import EvalConfig, ToyWorld, eval_seed, score_batch

PARTS = {  # named parameter subsets of a diffusers UNet2DConditionModel
    "targets": r"attn[12]\.(to_q|to_k|to_v|to_out\.0)\.weight$",
    "attentions": r"attentions\.",
    "resnets": r"resnets\.",
    "all": r".",
}


def trainable(unet, train: str, rank: int) -> list[torch.nn.Parameter]:
    """The parameters `train` names; "lora" adds a LoRA adapter on the harness's DreamBooth targets."""
    if train == "lora":
        from peft import LoraConfig

        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                    target_modules=DREAMBOOTH_TARGETS), adapter_name=ADAPTER)  # fmt: skip
        return [p for name, p in unet.named_parameters() if "lora" in name]
    pattern = re.compile(PARTS.get(train, train))
    params = [p for name, p in unet.named_parameters() if pattern.search(name)]
    if not params:
        raise ValueError(f"--train {train!r} matches no UNet parameter")
    return params


def score(world: ToyWorld, identity: dict, prompts, seeds_per_prompt: int) -> tuple[dict, list[np.ndarray]]:
    """ID similarity and adherence per prompt for "sks, <prompt>", and the images."""
    per_prompt, images_out = {}, []
    for index, prompt in prompts:
        seeds = [eval_seed(world.config.seed, identity["id"], index, s) for s in range(seeds_per_prompt)]
        images = world.generate(f"{DREAMBOOTH_TOKEN}, {prompt.text}", seeds)
        records = score_batch(world, identity, prompt, images, None)
        adherence = metrics.prompt_adherence([r["predicted"] for r in records], [prompt.attributes] * len(records))
        per_prompt[index] = {"id_sim": float(np.mean([r["id_sim"] for r in records])),
                             "adherence": adherence["adherence_mean"]}  # fmt: skip
        images_out += list(images)
    return per_prompt, images_out


def varied_references(world: ToyWorld, identity: dict) -> np.ndarray:
    """The person rendered in as many looks as it has references, each drawn at random: hair, clothing, glasses
    and background differ, so a fine-tune can only bind the trigger word to what they share, the person."""
    from hyperlora.toy.render import render, sample_look

    seeds = [eval_seed(world.config.seed, identity["id"], 11, r) for r in range(len(identity["images"]))]
    return np.stack([render(identity["id"], sample_look(np.random.default_rng(s)), world.config.size).image
                     for s in seeds])  # fmt: skip


def carry(config: EvalConfig, world: ToyWorld, index: int, args) -> list[dict]:
    """Fine-tune `args.train` on identity `index` and score it after each of `args.steps` cumulative steps."""
    from diffusers import DDPMScheduler

    from hyperlora.diffusion import diffusion_loss

    unet = world.pipe.unet
    original = {k: v.detach().clone() for k, v in unet.state_dict().items()} if args.train != "lora" else None
    identity = world.identity(index)
    if args.varied_looks:  # train on the person in looks of their own (the judge keeps its references' face)
        identity = {**identity, "images": varied_references(world, identity)}
    torch.manual_seed(eval_seed(config.seed, identity["id"], 1))
    params = trainable(unet, args.train, args.rank)
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    scheduler = DDPMScheduler.from_config(world.pipe.scheduler.config)
    generator = torch.Generator().manual_seed(eval_seed(config.seed, identity["id"], 2))
    with torch.no_grad():
        batch = DreamBooth(config, world)._data(identity)
    prompts, rows, grid, done, seconds = config.selected_prompts(), [], [], 0, 0.0
    default_guidance = world.config.guidance
    try:
        for count in [0, *args.steps]:
            start, losses = time.perf_counter(), []
            with torch.enable_grad():
                for p in params:
                    p.requires_grad_(True)
                for _ in tqdm(range(count - done), desc=f"person {index}: {args.train} to step {count}", leave=False):
                    loss = diffusion_loss(unet, scheduler, batch, generator, None)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    torch.nn.utils.clip_grad_norm_(params, 1.0)
                    optimizer.step()
                    losses.append(loss.item())
                for p in params:
                    p.requires_grad_(False)
            seconds, done = seconds + time.perf_counter() - start, count
            for guidance in args.guidance:  # the same weights sampled at each scale
                world.config.guidance = guidance
                per_prompt, images = score(world, identity, prompts, args.seeds_per_prompt)
                neutral = per_prompt.get(0, {}).get("id_sim")
                others = [v["adherence"] for i, v in per_prompt.items() if i != 0]
                rows.append({"identity": identity["id"], "train": args.train, "steps": count, "lr": args.lr,
                             "guidance": guidance, "trained_parameters": sum(p.numel() for p in params),
                             "train_s": round(seconds, 1),
                             "id_sim_all": float(np.mean([v["id_sim"] for v in per_prompt.values()])),
                             "id_sim_neutral": neutral, "adherence": float(np.mean(others)) if others else None,
                             "final_loss": float(np.mean(losses[-50:])) if losses else None, "per_prompt": per_prompt})  # fmt: skip
                grid.append(np.concatenate([*identity["images"], np.full_like(images[0], 255), *images], axis=1))
    finally:
        world.config.guidance = default_guidance
        if args.train == "lora":  # the base weights stay untouched under the adapter
            remove_adapter(unet, ADAPTER)
        else:
            unet.load_state_dict(original)
    sheet = Image.fromarray(np.concatenate(grid, axis=0))
    sheet.resize((sheet.width * 2, sheet.height * 2), Image.NEAREST).save(args.out / f"grid_{identity['id']}.png")
    return rows


def parse_guidance(text: str) -> list[float]:
    """'3.5,5' -> [3.5, 5.0]; every scale a finite number >= 1 (1 is no guidance; below it the prompt is inverted)."""
    try:
        scales = [float(g) for g in text.split(",")]
    except ValueError:
        raise SystemExit(f"--guidance takes comma-separated numbers, got {text!r}") from None
    if not all(np.isfinite(g) and g >= 1.0 for g in scales):
        raise SystemExit(f"--guidance scales must be finite and at least 1, got {text!r}")
    return list(dict.fromkeys(scales))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.carry", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("--train", default="targets", help="lora | targets | attentions | resnets | all | a regex")
    parser.add_argument("--steps", default="300,1000", help="cumulative step counts to score")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--rank", type=int, default=4, help="LoRA rank (--train lora)")
    parser.add_argument("--ids", default="0,2", help="indices into the held-out test identities")
    parser.add_argument("--num-references", type=int, default=8)
    parser.add_argument("--varied-looks", action="store_true", help="train on references in looks of their own "
                        "(toy world) instead of the harness's one shared look")  # fmt: skip
    parser.add_argument("--prompts", default="0,1,5,9", help="evaluation prompt indices (0: the neutral one)")
    parser.add_argument("--seeds-per-prompt", type=int, default=2)
    parser.add_argument("--guidance", default=str(EvalConfig.guidance),
                        help="guidance scale(s) to sample at, comma-separated (default: the harness's)")  # fmt: skip
    parser.add_argument("--unet", default="", help="a UNet folder to use in the toy pipeline instead of its own")
    parser.add_argument("--toy-dir", default="data/toy")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    args.steps = sorted({int(s) for s in args.steps.split(",")})
    args.guidance = parse_guidance(args.guidance)
    args.out.mkdir(parents=True, exist_ok=True)
    config = EvalConfig(world="toy", methods="dreambooth", num_references=args.num_references, prompts=args.prompts,
                        toy_dir=args.toy_dir)  # fmt: skip
    world = ToyWorld(config)
    if args.unet:
        from diffusers import UNet2DConditionModel

        world.pipe.unet = UNet2DConditionModel.from_pretrained(args.unet).eval()
    rows = []
    for index in [int(i) for i in args.ids.split(",")]:
        rows += carry(config, world, index, args)
        (args.out / "results.json").write_text(json.dumps({"args": {**vars(args), "out": str(args.out)},
                                                          "rows": rows}, indent=1) + "\n")  # fmt: skip
    print(f"{'person':>8} {'steps':>6} {'guidance':>8} {'id_sim all':>10} {'neutral':>8} {'adherence':>9} "
          f"{'train s':>8}")  # fmt: skip
    for r in rows:
        neutral, adherence = (f"{v:.3f}" if v is not None else "-" for v in (r["id_sim_neutral"], r["adherence"]))
        print(f"{r['identity']:>8} {r['steps']:>6} {r['guidance']:>8.1f} {r['id_sim_all']:>10.3f} {neutral:>8} "
              f"{adherence:>9} {r['train_s']:>8.0f}")  # fmt: skip
    for count in [0, *args.steps]:
        for guidance in args.guidance:
            at = [r for r in rows if r["steps"] == count and r["guidance"] == guidance]
            neutral = [r["id_sim_neutral"] for r in at if r["id_sim_neutral"] is not None]
            print(f"mean at {count} steps, guidance {guidance}: id_sim all {np.mean([r['id_sim_all'] for r in at]):.3f}"
                  + (f", neutral {np.mean(neutral):.3f}" if neutral else ""))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
