r"""`python -m eval.ablation --out DIR [--stages 1,3] [--hyper-dim K] [--rank R] [--reference other] [--seed S]`.

One point of the paper's ablations at a REDUCED training size, in the toy world: train the toy HyperLoRA
(`hyperlora.train`), then score it with the evaluation harness (`eval.protocol`) on held-out people: `hyperlora`
(personalised from the person's own references), `hyperlora_other` (from the NEXT person's: the control) and
`base` (the base model on the same seeds, which the harness generates anyway: the floor).

    --stages 1,3     the shipped toy model's recipe (the default); "1,2,3": the paper's schedule; "2,3" or "3":
                     without stage 1 (no Base-LoRA branch); "1,3" or "3": stage 3 without stage 2, i.e.
                     the ID-LoRA trained from scratch with ArcFace (every ID group
                     trains, for the steps of stages 2 and 3 together, so both arms train the ID branch
                     equally long; at stage 3's learning rate). "+" separates stages too ("1+2+3": a sweep's
                     grid value keeps it whole).
    --hyper-dim, --rank   K and the ID-LoRA rank (default: the toy preset's, 32 and 8)
    --reference      self: the target image augmented; other: another image of the same person

Every stage takes `--steps` steps (warmup: a tenth, at most the preset's) on a pool of `--people` train-split
people, encoded once into `--cache-dir` (share it between points), and validates on held-out people at its
end. DIR gets
    train/stage{N}/   the run folders of hyperlora.train (their resumable checkpoints/ removed once trained)
    eval/             the harness's run folder (summary.json, records, grids)
    summary.json      written last: the settings, training seconds and final validation figures per stage, ID
                      similarity with the person's own references, with the next person's, their gap, the base
                      model's, CLIP-T and adherence (scored at `--id-weight`, default 2.5: that recipe's, which
                      has no identity loss), with the harness's label, and the coefficient re-identification of
                      `--reid-people` held-out people (`reid_top1`). Always `"reduced_size": true`.
A failure prints its traceback, ends with the error's line, leaves no summary.json and exits 1 (bad values: 2).
--resume continues a point whose training was interrupted (finished stages are kept, evaluation reruns).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
ID_GROUPS = ("id_basis", "resampler_core", "clip_path", "arcface_path")  # a from-scratch stage 3 trains them all
SUMMARY = "summary.json"


def parse_stages(text: str) -> tuple[int, ...]:
    """'1,2,3' or '1+2+3' -> (1, 2, 3); stages in order, each once, and at least one that trains the ID-LoRA."""
    parts = [p.strip() for p in text.replace("+", ",").split(",")]
    if not all(p in ("1", "2", "3") for p in parts):
        raise ValueError(f"stages {text!r}: stages are 1, 2 and 3, written as 1,2,3 or 1+2+3")
    stages = tuple(int(p) for p in parts)
    if list(stages) != sorted(set(stages)):
        raise ValueError(f"stages {text!r}: each stage once, in order")
    if stages == (1,):
        raise ValueError("stages '1' trains only the Base-LoRA: there is no ID-LoRA to score (add 2 and/or 3)")
    return stages


@dataclass
class AblationPoint:
    """One ablation point: what is trained (reduced size) and how it is scored."""

    stages: str = "1,3"  # see parse_stages; no 1: no Base-LoRA branch; 3 without 2: ArcFace from scratch (the default,
    # the shipped toy model's recipe; the paper's "1,2,3" is the stage3 ablation)
    hyper_dim: int = 0  # K, basis matrices per LoRA matrix; 0: the toy preset's (32)
    rank: int = 0  # ID-LoRA rank (even); 0: the toy preset's (8)
    reference: str = "other"  # stages 2-3: "self" (the target image augmented) or "other" (another image)
    steps: int = 300  # optimiser steps per stage (a from-scratch stage 3: twice this)
    people: int = 300  # train-split people in the training pool
    cache_dir: str = ""  # the encoded pool, shared between points; "": DIR/train/cache
    seed: int = 0  # training seed (the evaluation's seed stays 0: the seeds' spread is the training's)
    eval_identities: int = 8  # held-out 'test' people scored (>= 2: the control needs a next person)
    prompts: str = "0,1,5,9"  # indices into data/eval/prompts.json (toy)
    seeds_per_prompt: int = 2  # images per person and prompt
    eval_steps: int = 20  # sampling steps
    id_weight: float = 2.5  # ID-LoRA weight of the scoring: the shipped toy model's (README, "The ID weight"); at the
    # release's 0.85 the toy ID-LoRA shows less than a third of its identity gap
    reid_people: int = 64  # held-out people of the coefficient re-identification (eval.coefficient_reid); 0: skipped
    toy_dir: str = str(REPO_ROOT / "data" / "toy")  # the shipped toy models
    threads: int = 1  # torch CPU threads
    smoke: bool = False  # plumbing size: the tests' tiny pool (2 looks, batch 4), 2 sampling steps, 1 prompt

    def __post_init__(self):
        from hyperlora.train.config import REFERENCE_MODES

        parse_stages(self.stages)
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.eval_identities < 2:
            raise ValueError(f"eval_identities must be >= 2 (the control personalises from the next person), "
                             f"got {self.eval_identities}")  # fmt: skip
        for name in ("steps", "people", "seeds_per_prompt", "eval_steps", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    @property
    def stage_list(self) -> tuple[int, ...]:
        return parse_stages(self.stages)

    @property
    def from_scratch(self) -> bool:
        """Stage 3 without stage 2: the ID-LoRA trained with ArcFace from scratch."""
        return 3 in self.stage_list and 2 not in self.stage_list


def stage_configs(point: AblationPoint, out: Path):
    """The RunConfig of every stage the point trains (unknown or bad values raise here, before anything runs)."""
    from hyperlora.train.config import load_preset, resolve
    from hyperlora.train.preview import SMOKE_RUN

    toy = Path(point.toy_dir).resolve()
    model = {"has_base_lora": 1 in point.stage_list}  # without stage 1 an untrained Base-LoRA would be zero
    model |= {k: v for k, v in (("hyper_dim", point.hyper_dim), ("rank", point.rank)) if v}
    run = {"pipeline": str(toy / "sdxl"), "clip": str(toy / "clip"), "faces": str(toy / "faces"),
           "cache_dir": str(Path(point.cache_dir or out / "train" / "cache").resolve()), "seed": point.seed,
           "threads": point.threads, "keep_checkpoints": 1}  # fmt: skip
    if point.smoke:
        run |= SMOKE_RUN
    run |= {"num_identities": point.people}
    preset = load_preset("toy").get("stages", {})
    configs = []
    for stage in point.stage_list:
        steps = point.steps * (2 if stage == 3 and point.from_scratch else 1)
        warmup = min(preset.get(str(stage), {}).get("warmup_steps", 100), max(1, steps // 10))
        overrides = {"steps": steps, "warmup_steps": warmup, "reference": point.reference}
        if stage == 3 and point.from_scratch:
            overrides["train_groups"] = ID_GROUPS
        stage_run = run | {"val_every": steps, "checkpoint_every": min(100, steps)}  # validate at the end
        configs.append(resolve("toy", stage, model=model, run=stage_run, stage_overrides=overrides))
    return configs


def eval_config(point: AblationPoint, checkpoint: Path):
    """The harness's EvalConfig: methods hyperlora, hyperlora_other and base on the first held-out people."""
    from .protocol import EvalConfig

    sizes = {"prompts": "0", "seeds_per_prompt": 1, "steps": 2} if point.smoke else {}
    return EvalConfig(**{"world": "toy", "methods": "hyperlora,hyperlora_other,base", "checkpoint": str(checkpoint),
                         "num_identities": point.eval_identities, "prompts": point.prompts,
                         "seeds_per_prompt": point.seeds_per_prompt, "steps": point.eval_steps,
                         "toy_dir": point.toy_dir, "smoke": point.smoke, "id_scale": point.id_weight,
                         **sizes})  # fmt: skip


def encode_pool(point: AblationPoint, out: str | Path) -> None:
    """Build the point's training and validation pools in its cache_dir now, so parallel points only read them."""
    import torch

    from hyperlora.train.loop import load_base_pipeline, load_training_sets

    config = stage_configs(point, Path(out))[0]
    torch.set_num_threads(point.threads)
    load_training_sets(config, load_base_pipeline(config.run.pipeline, "toy"), Path(config.run.cache_dir), False)


def _last_line(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return json.loads(lines[-1]) if lines else {}


def train(point: AblationPoint, out: Path, *, resume: bool = False, progress: bool = False) -> dict:
    """Train the point's stages into out/train; per stage: its steps, seconds and final validation figures."""
    from hyperlora.train.loop import DONE_FILE, train_schedule

    configs = stage_configs(point, out)
    folder = out / "train"
    if folder.exists() and not resume:
        raise FileExistsError(f"{folder} already holds a run: pass --resume to continue it, or another --out")
    train_schedule(configs, folder, resume=resume, progress=progress, command=sys.argv)
    stages = {}
    for config in configs:
        stage = folder / f"stage{config.stage.stage}"
        shutil.rmtree(stage / "checkpoints", ignore_errors=True)  # ~0.1 GB each; a finished stage never resumes
        done = json.loads((stage / DONE_FILE).read_text())
        val = _last_line(stage / "val.jsonl")
        stages[str(config.stage.stage)] = {
            "steps": config.stage.steps, "seconds": done.get("seconds", done["seconds_this_session"]),
            "resumed_from_step": done["resumed_from_step"], "train_groups": list(config.stage.groups),
            "val_gap": val.get("val_gap"), "val_coefficient_cosine": val.get("val_coefficient_cosine"),
        }  # fmt: skip
    return {
        "stages": stages,
        "model": configs[-1].model.to_dict(),
        "checkpoint": str(folder / f"stage{configs[-1].stage.stage}" / "hyperlora"),
    }


def evaluate(point: AblationPoint, checkpoint: Path, out: Path, *, progress: bool = False) -> dict:
    """Score the checkpoint (eval.protocol) into `out`; the figures of the summary."""
    import torch

    from .protocol import run_evaluation

    torch.set_num_threads(point.threads)
    if out.exists():
        shutil.rmtree(out)  # deterministic: a rerun scores again from nothing
    config = eval_config(point, checkpoint)
    summary = run_evaluation(config, out, progress=progress)
    rows = {row["variant"]: row for row in summary["rows"]}
    own, other, base = rows["hyperlora"], rows["hyperlora_other"], rows["base"]
    gap = None if own["id_sim"] is None or other["id_sim"] is None else own["id_sim"] - other["id_sim"]
    sizes = {k: getattr(config, k) for k in ("num_identities", "prompts", "seeds_per_prompt", "steps")}
    return {"id_sim": own["id_sim"], "id_sim_other_refs": other["id_sim"], "id_sim_gap": gap,
            "id_sim_base": base["id_sim"], "id_sim_sampling_seed_std": own.get("id_sim_seed_std"),
            "clip_t": own["clip_t"], "adherence": own.get("adherence_mean"),
            "face_failure_rate": own["face_failure_rate"], "label": summary["label"], "weights": own["weights"],
            "eval": sizes}  # fmt: skip


def reid_scores(point: AblationPoint, checkpoint: Path) -> dict:
    """Coefficient re-identification of held-out people (eval.coefficient_reid): a figure that moves long before the
    images show identity (9 % at 1,000 steps of the shipped run, 84 % at 14,000)."""
    if not point.reid_people:
        return {}
    from hyperlora.pipeline import HyperLoRAPipeline
    from hyperlora.toy.identity import split_identities

    from .coefficient_reid import reidentification

    toy = Path(point.toy_dir)
    pipe = HyperLoRAPipeline.from_pretrained("toy", checkpoint=checkpoint, pipeline=toy / "sdxl", clip=toy / "clip")
    result = reidentification(pipe, split_identities("test")[: (2 if point.smoke else point.reid_people)])
    return {"reid_top1": result["top1"], "reid_chance": result["chance"], "reid_same_cosine": result["same_cosine"],
            "reid_different_cosine": result["different_cosine"]}  # fmt: skip


def run_point(point: AblationPoint, out: str | Path, *, resume: bool = False, progress: bool = False) -> dict:
    """Train, score and write out/summary.json (see the module docstring); returns the summary."""
    out = Path(out)
    (out / SUMMARY).unlink(missing_ok=True)  # a failure must not leave an earlier run's summary behind
    stage_configs(point, out)  # bad values fail here, before anything is written
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    trained = train(point, out, resume=resume, progress=progress)
    train_seconds = time.perf_counter() - start
    start = time.perf_counter()
    scores = evaluate(point, Path(trained["checkpoint"]), out / "eval", progress=progress)
    scores |= reid_scores(point, Path(trained["checkpoint"]))
    model = trained["model"]
    summary = {
        "reduced_size": True, "smoke": point.smoke, "steps": point.steps, "stages": point.stages,
        "hyper_dim": model["hyper_dim"], "rank": model["rank"], "has_base_lora": model["has_base_lora"],
        "arcface_from_scratch": point.from_scratch, "reference": point.reference, "people": point.people,
        "seed": point.seed, **scores,
        "settings": dataclasses.asdict(point) | {"hyper_dim": model["hyper_dim"], "rank": model["rank"]},
        "train": trained["stages"], "train_seconds": round(train_seconds, 1),
        "eval_seconds": round(time.perf_counter() - start, 1), "checkpoint": trained["checkpoint"],
    }  # fmt: skip
    tmp = out / (SUMMARY + ".tmp")
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / SUMMARY)
    return summary


# ---------------------------------------------------------------------------------------------
# The command line: flags are AblationPoint's fields


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.ablation", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="the point's folder")
    p.add_argument("--resume", action="store_true", help="continue an interrupted training in --out")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    for field in dataclasses.fields(AblationPoint):
        flag = "--" + field.name.replace("_", "-")
        if field.type == "bool":
            p.add_argument(flag, dest=field.name, action="store_true", default=None)
        else:
            kind = {"int": int, "float": float}.get(field.type, str)
            p.add_argument(flag, dest=field.name, type=kind, default=None, help=f"default: {field.default!r}")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    given = {
        f.name: getattr(args, f.name) for f in dataclasses.fields(AblationPoint) if getattr(args, f.name) is not None
    }
    try:
        point = AblationPoint(**given)
        stage_configs(point, Path(args.out))
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.quiet:  # a sweep's log: no bar per loaded model either
        import diffusers
        import transformers

        diffusers.utils.logging.disable_progress_bar()
        transformers.utils.logging.disable_progress_bar()
    try:
        summary = run_point(point, args.out, resume=args.resume, progress=not args.quiet)
    except Exception as err:  # noqa: BLE001 (any failure: its traceback, then the one line a sweep records)
        traceback.print_exc()
        print(f"{type(err).__name__}: ablation point failed: {err}", file=sys.stderr)
        return 1
    figures = {k: summary[k] for k in ("id_sim", "id_sim_other_refs", "id_sim_gap", "clip_t", "adherence")}
    print(json.dumps(figures, indent=1))
    print(f"{summary['label']}\nwrote {Path(args.out) / SUMMARY}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
