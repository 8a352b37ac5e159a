"""Command line: `python -m hyperlora generate|personalize|finetune|info`.

    python -m hyperlora generate --face a.jpg b.jpg --prompt "a portrait in a spacesuit" --out out/
    python -m hyperlora personalize --face a.jpg --out id.safetensors       # the LoRA alone (kohya)
    python -m hyperlora finetune --face a.jpg b.jpg --steps 50 --out ft/    # the LoRA, then 50 steps on the photos
    python -m hyperlora info --world sdxl                                     # sizes, no weights

generate, personalize and finetune run in the toy world by default (data/toy; its HyperLoRA at
data/toy/hyperlora); --world sdxl takes local folders: --pipeline, --clip, --insightface-root, --checkpoint.
Flags are the fields of hyperlora.generate.GenerateConfig / PersonalizeConfig and
hyperlora.finetune.FinetuneCommand.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing
import warnings

from .config import list_presets
from .info import WORLDS, format_info, info


def add_fields(parser: argparse.ArgumentParser, cls) -> None:
    """One flag per dataclass field: lists take several values (or the flag repeated), bools are switches."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        flag, kind, help = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata.get("help", "")
        required = f.metadata.get("required", False)
        if kind is bool:
            parser.add_argument(flag, action="store_true", help=help)
        elif typing.get_origin(kind) is list:
            parser.add_argument(flag, nargs="+", action="extend", default=[], required=required, help=help)
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # int | None -> int
            default = f.default if f.default is not dataclasses.MISSING else None
            shown = f"{help} (default: {default})" if default not in (None, "") else help
            parser.add_argument(flag, type=base, default=default, required=required, help=shown,
                                choices=f.metadata.get("choices"))  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    from .finetune import FinetuneCommand
    from .generate import GenerateConfig, PersonalizeConfig

    parser = argparse.ArgumentParser(prog="python -m hyperlora", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="module and parameter counts of a HyperLoRA (meta device, no weights)")
    p_info.add_argument("--world", choices=sorted(WORLDS), default="sdxl")
    p_info.add_argument(
        "--preset", choices=list_presets(), default=None, help="hypernetwork preset (default: the world's)"
    )
    add_fields(commands.add_parser("generate", help="photos + prompts -> images, LoRA files, contact sheet, record"),
               GenerateConfig)  # fmt: skip
    add_fields(commands.add_parser("personalize", help="photos -> a LoRA file (kohya: ComfyUI, A1111)"),
               PersonalizeConfig)  # fmt: skip
    add_fields(commands.add_parser("finetune", help="photos -> HyperLoRA's LoRA fine-tuned on them (both formats)"),
               FinetuneCommand)  # fmt: skip
    args = parser.parse_args(argv)
    if args.command == "info":
        print(format_info(info(args.world, args.preset)))
        return 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s: %(message)s")
    warnings.filterwarnings("ignore", category=FutureWarning, module="insightface")  # its own deprecations, per face
    cls = {"generate": GenerateConfig, "personalize": PersonalizeConfig, "finetune": FinetuneCommand}[args.command]
    config = cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})
    return run(args.command, config, sys.argv[1:] if argv is None else argv)


def run(command: str, config, argv: list[str]) -> int:
    """Run one command; user errors (a bad photo, a missing model, a wrong flag) are one line, exit status 2."""
    from .checkpoint import CheckpointError
    from .conditioning.images import ConditioningError
    from .finetune import run_finetune
    from .generate import run_generate, run_personalize

    try:
        if command == "generate":
            out = run_generate(config, argv)
        elif command == "finetune":
            out = run_finetune(config, argv)
        else:
            out = run_personalize(config)
    except (ConditioningError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
