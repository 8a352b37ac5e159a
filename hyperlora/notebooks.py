"""Run the numbered notebooks headless with papermill: `python -m hyperlora.notebooks --out runs/demo`.

Every notebook has a `parameters` cell with `smoke` (tiny sizes for CI) and `out_dir` (where it
writes figures and results); this runner injects both and keeps each executed notebook. While a
notebook runs, papermill's bar counts its cells and the kernel's stderr (the package's tqdm bars,
warnings) is streamed to this terminal, so a long notebook is never a silent one (--quiet: neither).
The kernel is started with `tqdm.auto` bound to tqdm's text bar: in a kernel it would draw widgets,
which reach the executed notebook but not a terminal.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
# Kernel options while streaming: text bars for `from tqdm.auto import tqdm`, no bars for loading weights (a few
# hundred milliseconds each, one per model: noise in a terminal), no kernel log chatter.
STREAMING_KERNEL_ARGUMENTS = [
    "--IPKernelApp.exec_lines=import tqdm.auto, tqdm.std; tqdm.auto.tqdm, tqdm.auto.trange = tqdm.std.tqdm, tqdm.std.trange",
    ("--IPKernelApp.exec_lines=import diffusers, transformers; diffusers.utils.logging.disable_progress_bar(); "
     "transformers.utils.logging.disable_progress_bar()"),
    # scikit-image's deprecation notice from inside insightface's norm_crop (insightface's to fix, not ours)
    "--IPKernelApp.exec_lines=import warnings; warnings.filterwarnings('ignore', category=FutureWarning, module='insightface')",
    "--IPKernelApp.log_level=ERROR",
]

# The main job's parameters for the training notebooks (not smoke): a short 200-step run per stage on a 300-person
# pool encoded once, each stage
# starting from the previous notebook's model in the same output folder, so the three notebooks take minutes, not
# the toy schedule's hours (`python -m hyperlora.train --preset toy --stages 1,2,3` trains it in full). "{out}" is
# the runner's output folder.
MAIN_JOB_PARAMETERS = {
    "03_stage1_base_lora": {"steps": 200, "people": 300, "cache_dir": "{out}/cache"},
    "04_stage2_id_lora_clip": {"steps": 200, "people": 300, "cache_dir": "{out}/cache",
                               "init": "{out}/03_stage1_base_lora/stage1/model"},
    "05_stage3_id_lora_arcface": {"steps": 200, "people": 300, "cache_dir": "{out}/cache",
                                  "init": "{out}/04_stage2_id_lora_clip/stage2/model"},
    # two of the five ablations, one seed, 50 steps a stage on the same encoded pool: minutes, plumbing-sized (the
    # notebook's README cell gives the hours-long command for all five at 300 steps and three seeds)
    "07_ablations": {"cache_dir": "{out}/cache", "ablations": "stage1,stage3", "seeds": 1},
}


def notebook_paths(only: list[str] | None = None) -> list[Path]:
    paths = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
    if only:
        paths = [p for p in paths if any(p.name.startswith(o) or p.stem == o for o in only)]
        if not paths:
            raise ValueError(f"no notebook in {NOTEBOOK_DIR} matches {only}")
    return paths


def run_notebook(path: Path, out: Path, *, smoke: bool, parameters: dict | None = None, progress: bool = False) -> Path:
    """Execute one notebook into `out/<stem>/`, returning the executed copy's path.

    progress: papermill's bar over the cells, and the kernel's stderr (tqdm bars, warnings) streamed to ours.
    """
    import papermill

    folder = (out / path.stem).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    executed = folder / path.name
    papermill.execute_notebook(
        str(path), str(executed), cwd=str(path.parent), progress_bar=progress, kernel_name="python3",
        stderr_file=sys.stderr if progress else None, extra_arguments=STREAMING_KERNEL_ARGUMENTS if progress else [],
        parameters={"smoke": smoke, "out_dir": str(folder), **(parameters or {})},
    )  # fmt: skip
    return executed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora.notebooks", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("runs/notebooks"))
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, as in CI")
    parser.add_argument("--only", nargs="*", help="notebook numbers or names, e.g. 02")
    parser.add_argument("--quiet", action="store_true", help="no cell bar, no streamed stderr of the notebooks")
    args = parser.parse_args(argv)
    paths = notebook_paths(args.only)
    for number, path in enumerate(paths, 1):
        print(f"[notebooks] {number}/{len(paths)}: running {path.name} (smoke={args.smoke})", flush=True)
        parameters = {} if args.smoke else MAIN_JOB_PARAMETERS.get(path.stem, {})
        parameters = {k: v.format(out=args.out.resolve()) if isinstance(v, str) else v for k, v in parameters.items()}
        if "init" in parameters and not Path(parameters["init"]).is_dir():  # the previous notebook did not run here
            del parameters["init"]
        start = time.perf_counter()
        executed = run_notebook(path, args.out, smoke=args.smoke, parameters=parameters, progress=not args.quiet)
        print(f"[notebooks] {path.name} done in {time.perf_counter() - start:.0f} s; wrote {executed.parent}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
