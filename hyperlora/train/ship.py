r"""`python -m hyperlora.train.ship STAGE_DIR [STAGE_DIR ...] --out data/toy/hyperlora [--eval EVAL_DIR]`, and
`python -m hyperlora.train.ship MODEL_DIR --reevaluate --eval EVAL_DIR` for a shipped model scored again.

A trained schedule as a model folder that explains itself: the last stage's exported checkpoint (the official
four files, `base_resampler.safetensors` where there is a Base-LoRA, and `config.json`) plus a model card
(`model_card.json` and `README.md`) holding every stage's resolved config, command line and git commit, its steps,
seconds and final validation figures, the total training time and, with --eval, the evaluation harness's rows (ID
similarity, CLIP-T, ...) with its label. STAGE_DIRs are the stages' run folders in training order (each holding
`done.json`), or one schedule folder holding stage1/, stage2/, stage3/ (in its `schedule.json` order). The first may be a model folder shipped
before (its `model_card.json`), when the later stages continued from it (`--init`): its card's stages are carried
into the new card, so a fine-tuned continuation keeps the whole recipe. The weights must stay under --max-mb (a
shipped toy model is at most 25 MB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from ..checkpoint import load_checkpoint
from .loop import DONE_FILE, SCHEDULE_FILE, logged_seconds

CHECKPOINT = "hyperlora"  # the exported folder inside a stage's run folder
CARD = "model_card.json"  # a shipped model folder's card (hyperlora.toy.cards)
EVAL_FIGURES = ("id_sim", "id_sim_std", "trait_match", "clip_t", "clip_i_fidelity", "adherence_mean", "leakage_mean",
                "lpips_diversity", "face_failure_rate", "n_images", "n_identities", "weights", "label")  # fmt: skip


def snapshot_step(folder: Path) -> int | None:
    """The step of a `hyperlora.train.snapshot` folder (RUN/snapshots/step-N), else None."""
    config = folder / "config.json"
    if (folder / DONE_FILE).is_file() or not config.is_file():
        return None
    record = json.loads(config.read_text())
    return int(record["steps"]) if "snapshot_of" in record else None


def stage_folders(paths: list[str | Path]) -> list[Path]:
    """The stage run folders, in order: each given one, or the stage*/ folders of a schedule folder; the last may be
    a snapshot folder."""
    folders = []
    for index, path in enumerate(map(Path, paths)):
        if (path / CARD).is_file() and not (path / DONE_FILE).is_file():
            if index != 0 or len(paths) == 1:
                raise ValueError(f"{path}: a shipped model can only come first, before the stages continued from it")
            folders.append(path)
            continue
        if snapshot_step(path) is not None:
            if index != len(paths) - 1:
                raise ValueError(f"{path}: a snapshot of an unfinished stage can only be the last stage shipped")
            folders.append(path)
            continue
        if (path / DONE_FILE).is_file():
            folders.append(path)
            continue
        if (path / SCHEDULE_FILE).is_file():  # the schedule's own order (labelled phases: stage3-path)
            named = [path / name for name in json.loads((path / SCHEDULE_FILE).read_text())["folders"]]
        else:
            named = sorted(path.glob("stage[0-9]"))
        inner = [p for p in named if (p / DONE_FILE).is_file()]
        if not inner:
            raise FileNotFoundError(f"{path}: no {DONE_FILE} here or in a stage*/ folder: not a finished stage")
        folders += inner
    return folders


def _validation_at(path: Path, step: int | None) -> dict:
    """The last line of val.jsonl at or before `step` (None: the last line)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    lines = [line for line in lines if step is None or line["step"] <= step]
    return lines[-1] if lines else {}


def stage_records(folder: Path) -> list[dict]:
    """The card's records of one stage folder, or of every stage a shipped model's card holds (each marked with
    `carried_from`, the model folder, and the commit that shipped it)."""
    if not (folder / CARD).is_file() or (folder / DONE_FILE).is_file():
        return [stage_record(folder)]
    card = json.loads((folder / CARD).read_text())
    if not card.get("stages"):
        raise ValueError(f"{folder}: its {CARD} lists no stages, so the recipe it continues is unknown")
    return [{"carried_from": str(folder), "carried_card_commit": card.get("git_commit"), **record}
            for record in card["stages"]]  # fmt: skip  (a stage carried twice keeps its first card's marks)


def stage_record(folder: Path) -> dict:
    """What the card says about one stage: its config, command, commit, steps, seconds, final validation."""
    step = snapshot_step(folder)
    if step is None:
        run, done = folder, json.loads((folder / DONE_FILE).read_text())
        record = {"stage": done["stage"], "steps": done["steps"], "resumed_from_step": done["resumed_from_step"]}
    else:  # RUN/snapshots/step-N of a stage that was stopped (or is still training)
        run = folder.parents[1]
        record = {"stage": json.loads((folder / "config.json").read_text())["stage"], "steps": step,
                  "resumed_from_step": None, "snapshot": str(folder)}  # fmt: skip
    config = json.loads((run / "config.json").read_text())
    return {"folder": str(run), **record, "seconds": round(logged_seconds(run, up_to=step), 1),
            "final_validation": _validation_at(run / "val.jsonl", step), "command": config.get("command"),
            "git_commit": config.get("git_commit"), "config": config}  # fmt: skip


def eval_rows(folder: str | Path) -> dict:
    """The harness's summary.json rows (selected figures) by variant, and its label."""
    summary = json.loads((Path(folder) / "summary.json").read_text())
    rows = {row["variant"]: {k: row[k] for k in EVAL_FIGURES if k in row} for row in summary["rows"]}
    figures = {"label": summary.get("label", ""), "rows": rows, "folder": str(folder)}
    config = Path(folder) / "config.json"
    if config.is_file():  # the ID-LoRA weight its figures were measured at
        figures["id_scale"] = json.loads(config.read_text())["config"]["id_scale"]
    if summary.get("control_gap"):  # own references minus the next person's, paired (eval.summary.paired_gap)
        figures["control_gap"] = summary["control_gap"]
    return figures


def _id_weight(evaluation: dict | None, id_weight: float | None) -> float | None:
    """The ID-LoRA weight to record: the evaluation's (`eval_rows`: its figures were measured at it), which
    `id_weight` must equal when both are given; without an evaluation, `id_weight` as given (None: none recorded)."""
    if evaluation is None:
        return id_weight
    if "id_scale" not in evaluation:
        raise FileNotFoundError(f"{evaluation['folder']}: no config.json, so the ID weight it measured is unknown")
    measured = evaluation["id_scale"]
    if id_weight is not None and abs(id_weight - measured) > 1e-9:
        raise ValueError(f"--id-weight {id_weight}: the evaluation {evaluation['folder']} was measured at ID weight {measured}; "
                         "ship the weight its figures hold, or evaluate at this one (eval.run --id-scale)")  # fmt: skip
    return float(measured)


def ship(stages: list[str | Path], out: str | Path, *, evaluation: str | Path | None = None, name: str = "toy HyperLoRA",
         note: str = "", id_weight: float | None = None, max_mb: float = 25.0, overwrite: bool = False) -> Path:  # fmt: skip
    """Copy the last stage's checkpoint into `out` and write its model card (`note`: a sentence on the recipe, put
    in its summary); returns `out`. `id_weight` (default: the evaluation's) goes into config.json as the weight
    `generate`, the pipeline and the harness use the checkpoint at (`hyperlora.checkpoint.recommended_id_weight`)."""
    from ..toy.cards import folder_megabytes, write_model_card  # the card format every shipped model uses

    folders = stage_folders(stages)
    evaluation_figures = eval_rows(evaluation) if evaluation is not None else None
    id_weight = _id_weight(evaluation_figures, id_weight)
    if id_weight is not None and id_weight <= 0:
        raise ValueError(f"id_weight {id_weight}: the ID-LoRA weight must be positive")
    records = [record for f in folders for record in stage_records(f)]  # read before `out` may be replaced
    source = Path(records[-1].get("snapshot") or folders[-1] / CHECKPOINT)  # a snapshot is the checkpoint itself
    load_checkpoint(source)  # a checkpoint that does not load is never shipped
    size = folder_megabytes(source)
    if size > max_mb:
        raise ValueError(f"{source}: {size:.1f} MB of weights, over the {max_mb} MB a shipped model may take")
    out = Path(out)
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists: pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    shutil.copytree(source, out)
    if id_weight is not None:
        config = json.loads((out / "config.json").read_text())
        (out / "config.json").write_text(json.dumps(config | {"id_weight": id_weight}, indent=2) + "\n")
    figures = {"stages": [{k: r[k] for k in ("stage", "steps", "seconds", "resumed_from_step")}
                          | {k: v for k, v in r["final_validation"].items() if k != "step"} for r in records]}  # fmt: skip
    if evaluation_figures is not None:
        figures["evaluation"] = evaluation_figures
    stages_text = ", ".join(f"stage {r['stage']} {r['steps']:,} steps" for r in records)
    summary = (f"A HyperLoRA hypernetwork trained by `hyperlora.train` ({stages_text}); the checkpoint is the official "
               "four-file format (plus the Base-LoRA resampler), fp16. Per-stage configs and commands: model_card.json "
               "`stages`.")  # fmt: skip
    if id_weight is not None:
        summary += f" Use it at ID-LoRA weight {id_weight:g} (config.json `id_weight`: generate's default)."
    if note:
        summary += f" {note}"
    if evaluation is not None and figures["evaluation"]["label"]:
        summary += f" Evaluation label: {figures['evaluation']['label']}"
    write_model_card(out, name=name, summary=summary, config=records[-1]["config"].get("stage", {}),
                     train_seconds=sum(r["seconds"] for r in records), figures=figures,
                     command=[sys.executable, "-m", "hyperlora.train.ship", *map(str, stages), "--out", str(out),
                              *(["--eval", str(evaluation)] if evaluation is not None else [])],
                     extra={"stages": records},
                     threads=max(r["config"].get("run", {}).get("threads", 0) for r in records) or None)  # fmt: skip
    return out


def reevaluate(model: str | Path, evaluation: str | Path) -> Path:
    """Put a new evaluation into a shipped model's card (`--reevaluate`): weights, stages and recipe unchanged. For a
    judge or protocol that changed after shipping; the evaluation it replaces stays in `figures.earlier_evaluations`
    and the original ship command and commit in `shipped_by`. The new evaluation must be at the model's ID weight."""
    from ..toy.cards import write_model_card

    model = Path(model)
    card = json.loads((model / CARD).read_text()) if (model / CARD).is_file() else {}
    if (model / DONE_FILE).is_file() or not card.get("stages"):
        raise ValueError(f"{model}: not a shipped model folder (a {CARD} that lists its stages)")
    figures = eval_rows(evaluation)
    used_at = json.loads((model / "config.json").read_text()).get("id_weight")
    if used_at is not None and figures.get("id_scale") != used_at:
        raise ValueError(f"{evaluation} was measured at ID weight {figures.get('id_scale')}; {model} is used at {used_at}")
    earlier = card["figures"].get("earlier_evaluations", []) + [card["figures"]["evaluation"]] * ("evaluation" in card["figures"])
    summary = card["summary"].split(" Evaluation label: ")[0]
    summary += f" Evaluation label: {figures['label']}" if figures["label"] else ""
    shipped_by = card.get("shipped_by") or {k: card.get(k) for k in ("command", "git_commit", "created_utc")}
    write_model_card(model, name=card["name"], summary=summary, config=card["config"], train_seconds=card["train_seconds"],
                     figures={**card["figures"], "evaluation": figures, "earlier_evaluations": earlier},
                     gates=card.get("gates") or None, command=[sys.executable, "-m", "hyperlora.train.ship", str(model),
                     "--reevaluate", "--eval", str(evaluation)], extra={"stages": card["stages"], "shipped_by": shipped_by},
                     threads=card.get("environment", {}).get("threads"))  # fmt: skip
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hyperlora.train.ship", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("stages", nargs="+", help="the stages' run folders in order, or one schedule folder; the "
                        "last may be a snapshot (RUN/snapshots/step-N) of a stage stopped early")
    parser.add_argument("--out", help="the model folder to write (e.g. data/toy/hyperlora)")
    parser.add_argument("--eval", help="an eval.run output folder scoring this checkpoint (its summary.json)")
    parser.add_argument("--name", default="toy HyperLoRA")
    parser.add_argument("--note", default="", help="a sentence on the recipe for the card's summary")
    parser.add_argument("--id-weight", type=float, help="the ID-LoRA weight to use it at (default: the --eval run's)")
    parser.add_argument("--max-mb", type=float, default=25.0)
    parser.add_argument("--overwrite", action="store_true")
    parser.add_argument("--reevaluate", action="store_true", help="with one shipped model folder and --eval: put the "
                        "new evaluation into its card, weights and stages unchanged (the earlier one is kept)")
    args = parser.parse_args(argv)
    if args.reevaluate:
        if len(args.stages) != 1 or not args.eval or args.out:
            parser.error("--reevaluate takes one shipped model folder and --eval, and no --out")
        try:
            print(f"re-evaluated {reevaluate(args.stages[0], args.eval)}")
        except (FileNotFoundError, ValueError) as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        return 0
    if not args.out:
        parser.error("--out is required (the model folder to write)")
    try:
        out = ship(args.stages, args.out, evaluation=args.eval, name=args.name, note=args.note,
                   id_weight=args.id_weight, max_mb=args.max_mb, overwrite=args.overwrite)  # fmt: skip
    except (FileNotFoundError, FileExistsError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"shipped {out} ({json.loads((out / 'model_card.json').read_text())['weights_mb']:.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
