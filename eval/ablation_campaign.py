"""The ablations of notebook 07: the baseline, each ablation's values, and the sweeps of `eval.ablation` points that
train and score them (`hyperlora.sweep`), several sweeps at once (`campaign`). Tables and figures:
`eval.ablation_report`.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path

from .ablation import REPO_ROOT, AblationPoint

# The baseline is the shipped toy model's recipe: stage 1, then the ID-LoRA from scratch with ArcFace ("1+3"); the
# paper's CLIP-first schedule is an ablation, because the toy CLIP carries too little identity for stage 2 to learn
# from (README, Training). K and rank: the toy preset's.
BASELINE = {"stages": "1+3", "hyper_dim": 32, "rank": 8, "reference": "other"}
ABLATIONS = {  # name -> (the point's field, its values besides the baseline's, what it compares)
    "k": ("hyper_dim", (8, 128), "K, basis matrices per LoRA matrix"),
    "rank": ("rank", (4, 16), "ID-LoRA rank"),
    "stage1": ("stages", ("3",), "with stage 1 (Base-LoRA), or without it"),
    "stage3": ("stages", ("1+2+3",), "the ID-LoRA from scratch with ArcFace, or stage 3 after a CLIP stage 2"),
    "reference": ("reference", ("self",), "reference: another image of the person, or the target image itself"),
}
# The figures of a point's summary.json that the tables aggregate over seeds.
FIGURES = ("id_sim", "id_sim_other_refs", "id_sim_gap", "id_sim_base", "clip_t", "adherence", "reid_top1")


def sweep(grid: dict, out: str | Path, *, jobs: int = 1, timeout: float | None = None, progress: bool = True,
          **settings) -> list[dict]:  # fmt: skip
    """`hyperlora.sweep.run_sweep` of this CLI: `grid` (field -> values) over the baseline with `settings` fixed."""
    from hyperlora.sweep import run_sweep

    fixed = {k: v for k, v in {**BASELINE, **settings}.items() if k not in grid}
    smoke = fixed.pop("smoke", False)
    unknown = (set(grid) | set(fixed)) - {f.name for f in dataclasses.fields(AblationPoint)}
    if unknown:
        raise ValueError(f"unknown ablation settings {sorted(unknown)}; settings: the fields of AblationPoint")
    flags = "".join(f" --{k.replace('_', '-')} {{{k}}}" for k in [*grid, *fixed])
    python = shlex.quote(sys.executable)
    command = f"cd {shlex.quote(str(REPO_ROOT))} && {python} -m eval.ablation --quiet --resume --out {{out}}"
    command += flags + (" --smoke" if smoke else "")
    grid = {k: [str(v) for v in values] for k, values in grid.items()}
    params = {k: str(v) for k, v in fixed.items()}
    return run_sweep(
        command, grid, out, params=params, jobs=jobs, timeout=timeout, progress=progress, keep_unfinished=True
    )  # with --resume: an interrupted point continues from its checkpoint


def run_ablation(name: str, out: str | Path, *, seeds, values=None, **kwargs) -> list[dict]:
    """One ablation's non-baseline values (all, or the given subset) x seeds in out/name (the baseline's points:
    `sweep({"seed": seeds})` in out/baseline, shared by every ablation)."""
    if name not in ABLATIONS:
        raise ValueError(f"unknown ablation {name!r}; ablations: {sorted(ABLATIONS)}")
    key, known, _ = ABLATIONS[name]
    chosen = [str(v) for v in known] if values is None else [str(v) for v in values]
    if not chosen or set(chosen) - {str(v) for v in known}:
        raise ValueError(f"ablation {name!r}: values {chosen} must be among {[str(v) for v in known]}")
    return sweep({key: chosen, "seed": list(seeds)}, Path(out) / name, **kwargs)


def parse_values(text: str) -> dict[str, list[str]]:
    """'k=8;rank=4,16' -> {'k': ['8'], 'rank': ['4', '16']}: which values of those ablations to run ('': all)."""
    chosen = {}
    for part in filter(None, (p.strip() for p in text.split(";"))):
        name, _, values = part.partition("=")
        if not values:
            raise ValueError(f"values {text!r}: write ablation=value,value;ablation=value (e.g. 'k=8;rank=4')")
        chosen[name.strip()] = [v.strip() for v in values.split(",") if v.strip()]
    return chosen


def campaign(names, out: str | Path, *, seeds, jobs: int = 1, values: dict | None = None, **kwargs) -> dict:
    """The baseline's sweep and each named ablation's, `jobs` sweeps at once (each one point at a time, so `jobs`
    points train together, one thread each). Each sweep has its own folder, so none writes another's files. Returns
    {"baseline" or ablation: its sweep's rows}."""
    from concurrent.futures import ThreadPoolExecutor

    values = values or {}
    unknown = sorted((set(names) | set(values)) - set(ABLATIONS))
    if unknown:
        raise ValueError(f"unknown ablations {unknown}; ablations: {sorted(ABLATIONS)}")
    kwargs |= {"jobs": 1, "progress": False}  # parallel sweeps: a bar each would interleave
    tasks = {"baseline": lambda: sweep({"seed": list(seeds)}, Path(out) / "baseline", **kwargs)}
    for name in names:
        tasks[name] = lambda name=name: run_ablation(name, out, seeds=seeds, values=values.get(name), **kwargs)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {name: pool.submit(task) for name, task in tasks.items()}
        return {name: future.result() for name, future in futures.items()}
