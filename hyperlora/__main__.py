"""Command line: `python -m hyperlora info --world sdxl`."""

from __future__ import annotations

import argparse
import sys

from .config import list_presets
from .info import WORLDS, format_info, info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    p_info = commands.add_parser("info", help="module and parameter counts of a HyperLoRA (meta device, no weights)")
    p_info.add_argument("--world", choices=sorted(WORLDS), default="sdxl")
    p_info.add_argument("--preset", choices=list_presets(), default=None, help="hypernetwork preset (default: the world's)")
    args = parser.parse_args(argv)
    if args.command == "info":
        print(format_info(info(args.world, args.preset)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
