"""Command line of the toy world: `python -m hyperlora.toy build` retrains every toy model; `info` lists them;
`train-unet` and `train-controlnet` train one candidate model each; `train-traits` the identity-trait reader, the
evaluation's second identity judge; `train-clip` a toy CLIP apart from the build (the evaluation's judge CLIP)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .build import SELECTABLE, build, info, listen_for_thread_share
from .pipeline import DEFAULT_TOY_DIR


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora.toy", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p_build = commands.add_parser("build", help="retrain the toy models from scratch and assemble the toy SDXL")
    p_build.add_argument("--out", default=str(DEFAULT_TOY_DIR), help="output folder (default: data/toy in the repo)")
    p_build.add_argument("--smoke", action="store_true", help="every trainer's smoke preset: plumbing only, seconds")
    p_build.add_argument("--only", nargs="+", choices=SELECTABLE, help="run only these steps (in build order)")
    p_build.add_argument("--standins", action="store_true", help="random stand-ins for a missing CLIP or VAE")
    p_build.add_argument("--jobs", type=int, default=2, help="steps run at once, one process and torch thread each "
                         "(default 2: the 90-minute budget on 2 cores assumes it)")
    p_build.add_argument("--step", choices=SELECTABLE, help=argparse.SUPPRESS)  # one step exactly (parallel builds)
    p_build.add_argument("--threads-file", help=argparse.SUPPRESS)  # where a parallel build writes this step's threads
    p_info = commands.add_parser("info", help="what is present under the toy folder, with sizes")
    p_info.add_argument("--out", default=str(DEFAULT_TOY_DIR))
    p_diag = commands.add_parser("diagnose", help="where a gate is lost (hyperlora.toy.diagnostics); prints JSON")
    p_diag.add_argument("what", choices=["ceiling", "probe", "vae", "looks", "trigger"], help="ceiling: supervised CNN on "
                        "the renders; probe: linear probe on the CLIP's vision features; vae: the VAE's identity loss, "
                        "split; looks: toy-ArcFace similarity of different people sharing one look; trigger: the base "
                        "model's prompt adherence with HyperLoRA's trigger words against without")
    p_diag.add_argument("--out", default=str(DEFAULT_TOY_DIR), help="toy folder holding clip/, vae/ and faces/")
    p_unet = commands.add_parser("train-unet", help="train one toy UNet candidate (a base-model experiment), resumable")
    p_unet.add_argument("--out", required=True, help="the UNet folder to write (checkpoints/ inside while training)")
    p_unet.add_argument("--like", default=str(DEFAULT_TOY_DIR / "sdxl" / "unet"), help="start from this UNet folder's "
                        "training config (its training_card.json or model_card.json)")
    p_unet.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="config overrides, e.g. "
                        "block_out_channels=[64,64,128] threads=1 (values parsed as JSON, else as strings)")
    p_unet.add_argument("--toy-dir", default=str(DEFAULT_TOY_DIR), help="toy folder holding clip/ and vae/")
    p_unet.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p_cn = commands.add_parser("train-controlnet", help="train a face-pose ControlNet for a toy UNet, resumable")
    p_cn.add_argument("--out", required=True, help="the ControlNet folder to write (checkpoints/ inside while training)")  # fmt: skip
    p_cn.add_argument("--unet", default=str(DEFAULT_TOY_DIR / "sdxl" / "unet"), help="the frozen UNet folder it "
                      "steers (default: the shipped one)")  # fmt: skip
    p_cn.add_argument("--pipeline", default=str(DEFAULT_TOY_DIR / "sdxl"), help="toy pipeline folder whose text "
                      "encoders and VAE encode the training set")  # fmt: skip
    p_cn.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="ControlNetTrainConfig overrides, "
                      "e.g. steps=4000 batch_size=16 (values parsed as JSON, else as strings)")  # fmt: skip
    p_cn.add_argument("--smoke", action="store_true", help="start from the smoke preset (seconds), not the defaults")
    p_cn.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p_tr = commands.add_parser("train-traits", help="train the identity-trait reader (eval's trait_match judge)")
    p_tr.add_argument("--out", default=str(DEFAULT_TOY_DIR / "traits"), help="folder to write (default: data/toy/traits)")
    p_tr.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="TraitReaderConfig overrides, e.g. "
                      "steps=1000")  # fmt: skip
    p_tr.add_argument("--smoke", action="store_true", help="the smoke preset (seconds; plumbing only)")
    p_clip = commands.add_parser("train-clip", help="train a toy CLIP apart from the build (e.g. the evaluation's "
                                 "judge CLIP, data/toy/clip_judge)")  # fmt: skip
    p_clip.add_argument("--out", required=True, help="the CLIP folder to write (model, tokenizer, model card)")
    p_clip.add_argument("--set", nargs="*", default=[], metavar="KEY=JSON", help="CLIPTrainConfig overrides, e.g. "
                        "steps=4200 seed=1 data_seed=1 (values parsed as JSON, else as strings)")  # fmt: skip
    p_clip.add_argument("--smoke", action="store_true", help="the smoke preset (seconds; plumbing only)")
    args = parser.parse_args(argv)
    if args.command == "train-clip":
        return _train_clip(args)
    if args.command == "train-traits":
        return _train_traits(args)
    if args.command == "train-unet":
        return _train_unet(args)
    if args.command == "train-controlnet":
        return _train_controlnet(args)
    if args.command == "diagnose":
        from . import diagnostics

        out = Path(args.out)
        result = {"ceiling": lambda: diagnostics.attribute_ceiling(),
                  "probe": lambda: diagnostics.clip_linear_probe(out / "clip"),
                  "vae": lambda: diagnostics.vae_identity_breakdown(out / "vae", out / "faces"),
                  "looks": lambda: diagnostics.shared_look_identity_level(out / "faces"),
                  "trigger": lambda: diagnostics.trigger_word_damage(out)}[args.what]()
        print(json.dumps(result, indent=2, default=str))
        return 0
    if args.command == "info":
        for row in info(args.out):
            state = f"{row['mb']:8.1f} MB" if row["present"] else "  missing"
            verdict = {True: "gates passed", False: "gates FAILED", None: "no gates"}
            card = verdict[row.get("passed")] if row["card"] else "no card"
            print(f"{row['folder']:<16} {state}  {card}")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.step:
        if args.threads_file:
            listen_for_thread_share(args.threads_file)
        outcomes = build(args.out, smoke=args.smoke, only=[args.step], standins=args.standins, exact=True)
    else:
        outcomes = build(args.out, smoke=args.smoke, only=args.only, standins=args.standins, jobs=args.jobs)
    print("\n".join(f"{name:<11} {outcome}" for name, outcome in outcomes.items()))
    return 1 if any(o.startswith("FAILED") for o in outcomes.values()) else 0


def _train_unet(args) -> int:
    from .unet import UNetTrainConfig, train_unet

    like = Path(args.like)
    card = next((like / n for n in ("training_card.json", "model_card.json") if (like / n).is_file()), None)
    if card is None:
        raise SystemExit(f"--like {like}: no training_card.json or model_card.json there")
    values = {**json.loads(card.read_text())["config"], **_overrides(args.set)}
    config = UNetTrainConfig.from_dict(values)  # unknown keys raise
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    toy = Path(args.toy_dir)
    train_unet(config, args.out, clip_path=toy / "clip", vae_path=toy / "vae", resume=args.resume)
    return 0


def _train_controlnet(args) -> int:
    import dataclasses

    from .controlnet import ControlNetTrainConfig, train_controlnet

    base = ControlNetTrainConfig.smoke() if args.smoke else ControlNetTrainConfig()
    config = ControlNetTrainConfig.from_dict({**dataclasses.asdict(base), **_overrides(args.set)})  # unknown keys raise
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    train_controlnet(config, args.out, unet_dir=args.unet, pipeline_dir=args.pipeline, resume=args.resume)
    return 0


def _train_clip(args) -> int:
    import dataclasses

    from .clip import CLIPTrainConfig, train_clip

    base = CLIPTrainConfig.smoke() if args.smoke else CLIPTrainConfig()
    config = CLIPTrainConfig.from_dict({**dataclasses.asdict(base), **_overrides(args.set)})  # unknown keys raise
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    card = json.loads((train_clip(config, args.out) / "model_card.json").read_text())
    print(json.dumps({key: card[key] for key in ("gates", "passed", "train_seconds")}, indent=2))
    return 0 if card["passed"] else 1


def _train_traits(args) -> int:
    import dataclasses

    from .trait_reader import TraitReaderConfig, train_trait_reader

    base = TraitReaderConfig.smoke() if args.smoke else TraitReaderConfig()
    values = {**dataclasses.asdict(base), **_overrides(args.set)}
    unknown = set(values) - {f.name for f in dataclasses.fields(TraitReaderConfig)}
    if unknown:
        raise SystemExit(f"--set: unknown TraitReaderConfig keys {sorted(unknown)}")
    config = TraitReaderConfig(**{**values, "widths": tuple(values["widths"])})
    print(json.dumps(train_trait_reader(args.out, config), indent=2))
    return 0


def _overrides(items: list[str]) -> dict:
    """--set KEY=VALUE items as a dict, each value parsed as JSON where it parses, else kept as a string."""
    values = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r}: expected KEY=VALUE")
        try:
            values[key] = json.loads(text)
        except json.JSONDecodeError:
            values[key] = text
    return values


if __name__ == "__main__":
    sys.exit(main())
