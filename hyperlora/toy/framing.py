"""Run any command of this repository in a toy world whose faces are larger (or smaller) in the frame.

    python -m hyperlora.toy.framing 1.3 hyperlora.toy train-unet --out runs/framing/unet_1.3 \
        --set init_from=data/toy/sdxl/unet steps=3000 lr=0.0003 warmup_steps=100
    python -m hyperlora.toy.framing 1.3 eval.carry --train lora --rank 4 --lr 1e-3 --steps 300,1000 \
        --ids 0,1,2,3 --unet runs/framing/unet_1.3 --out runs/framing/carry_lora_1.3

Multiplies the renderer's `HEAD_SCALE` by FACTOR in this process, then runs `python -m MODULE ARGS...`:
every render of that run (training caches, references, the ceiling, the harness's prompts) has the head and
body FACTOR times larger about the same centre. 1.3 gives a ~36 px face box at 64 px instead of ~28.
Only this process renders that way: a command that starts worker processes (`accelerate launch`, a parallel
`hyperlora.toy build`) would render at the default framing in them, so run those one process at a time.

It is an experiment switch for issue 17's question "is the face too small for the base model to carry a
person?", not a world setting: the shipped toy models were trained at 1.0. Measured on real renders
(16 held-out people x 4 prompts x 2 seeds, 64 people for the judges): the toy face detector and recogniser
still find and verify every face at 1.3 and the VAE still round-trips the identity (ID similarity 0.776
against 0.754 at 1.0), but the toy CLIP's look judge falls from 0.951 to 0.784 (clothing type 0.45: the
clothing is mostly out of frame) and the trait reader from 0.671 to 0.478, so adherence and trait figures
of a framed run are off their models' training distribution. README, "A larger face in the frame".
"""

from __future__ import annotations

import importlib.util
import math
import runpy
import sys

from . import render

USAGE = "usage: python -m hyperlora.toy.framing FACTOR MODULE [ARGS...]   (FACTOR > 0, e.g. 1.3)"


def set_framing(factor: float) -> float:
    """Scale every later render's head and body by `factor` (this process only); returns the new HEAD_SCALE."""
    if not (factor > 0 and math.isfinite(factor)):
        raise ValueError(f"the framing factor must be > 0 and finite, got {factor}")
    render.HEAD_SCALE = render.HEAD_SCALE * factor
    return render.HEAD_SCALE


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if len(argv) < 2 or argv[0] in ("-h", "--help"):
        print(__doc__ + "\n" + USAGE)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    try:
        factor = float(argv[0])
    except ValueError:
        raise SystemExit(f"FACTOR must be a number, got {argv[0]!r}\n{USAGE}") from None
    module = argv[1]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        found = False
    if not found:
        raise SystemExit(f"no module {module!r} to run\n{USAGE}")
    try:
        scale = set_framing(factor)
    except ValueError as error:
        raise SystemExit(f"{error}\n{USAGE}") from None
    print(f"toy framing x{factor:g}: HEAD_SCALE {scale:.4f} (the shipped models were trained at x1)", file=sys.stderr)
    sys.argv = [module, *argv[2:]]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
