"""Per-person coefficient targets for training people, and a resampler distilled onto them: can the map from a
person's features to their best coefficients be learned at all, apart from how the diffusion loss weighs it?

Issue 17's measurements: over the scale-10 bases, one person's ID coefficients fitted to their references
(`coef_ft`) reach 0.313 ID similarity, where the resampler's own read 0.165-0.196 however long it trains, and its
coefficients for different people stay at cosine 0.83-0.85. Two steps separate "the resampler cannot represent
the map" from "the stage loss does not ask for it":

    fit      one row of ID coefficient tokens per training person, fitted with the stage-3 loss of case (a)
             (trigger words, ID + the frozen Base-LoRA, the face-weighted diffusion loss), bases and UNet frozen, on
             that person's looks from the training pool. A batch holds several people, so a step fits them all
             (per-sample LoRAs): the batched `coef_ft` of many people.
    distill  the resampler's paths (bases frozen) regress each person's features onto their row: 1 - cosine per
             token. Rows of people held out of the distillation say whether the map generalises.

    python -m eval.coefficient_targets fit --checkpoint CKPT --people 0:64 --steps 1600 --out runs/targets/a
    python -m eval.coefficient_targets distill --checkpoint CKPT --tables runs/targets/a runs/targets/b \
        --val-people 16 --steps 3000 --out runs/targets/distilled

This is a diagnostic, not the paper's recipe: the paper trains the resampler with the diffusion loss alone.
The distilled folder loads like any checkpoint (`eval.run --checkpoint DIR/hyperlora`).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from hyperlora.checkpoint import load_checkpoint
from hyperlora.checkpoint import save_checkpoint as save_hyperlora
from hyperlora.train.config import StageConfig, TrainConfig
from hyperlora.train.data import TRAINING_SET_FILE, TrainingSet, sample_batch, step_seed
from hyperlora.train.loop import load_base_pipeline, load_identity_term
from hyperlora.train.losses import base_coefficient_table, coefficient_cosine, stage_loss
from hyperlora.train.params import select_trainable

logger = logging.getLogger(__name__)

TABLE_FILE = "table.safetensors"
RESAMPLER_GROUPS = ("resampler_core", "clip_path", "arcface_path")
SAVE_EVERY = 200  # fit steps per saved table (the rows and Adam's moments: a killed fit resumes from the last)


def parse_people(text: str) -> list[int]:
    """'0:64' -> 0..63; '3,5,9' -> those."""
    if ":" in text:
        start, stop = (int(v) for v in text.split(":"))
        people = list(range(start, stop))
    else:
        people = [int(v) for v in text.split(",") if v.strip()]
    if not people or min(people) < 0:
        raise ValueError(f"--people {text!r}: give a range 'a:b' (a < b) or ids '1,2,3', none negative")
    return people


def pool_of(data: TrainingSet, people: list[int]) -> TrainingSet:
    """The training set with only `people`'s images valid (the others stay, unused)."""
    chosen = torch.isin(data.person, torch.tensor(people))
    missing = sorted(set(people) - set(data.person[chosen & data.valid].tolist()))
    if missing:
        raise ValueError(f"people {missing[:10]} have no valid image in the training pool ({len(missing)} in all)")
    return dataclasses.replace(data, valid=data.valid & chosen)


def first_images(data: TrainingSet, people: list[int]) -> torch.Tensor:
    """Each person's first valid image index."""
    return torch.tensor([int(((data.person == p) & data.valid).nonzero()[0]) for p in people])


class TableGenerator(nn.Module):
    """The stage loss's LoRA generator with one row of ID coefficient tokens per person instead of the resampler:
    `rows` (set per batch) picks each reference's row; the tokens are kept unit-norm as the resampler's are."""

    def __init__(self, hyperlora, table: torch.Tensor):
        super().__init__()
        self.hyperlora = hyperlora
        self.table = nn.Embedding.from_pretrained(table.flatten(1).clone(), freeze=False, sparse=True)
        self.shape = tuple(table.shape[1:])
        self.rows: torch.Tensor | None = None

    def tokens(self, rows: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.table(rows).view(len(rows), *self.shape), dim=-1)

    def forward(self, *, branch: str, clip=None, arcface=None):
        if branch != "id" or self.rows is None:
            raise ValueError("a TableGenerator makes ID-LoRAs of the rows set for the batch")
        return self.hyperlora.assemble(self.tokens(self.rows), "id")


@dataclasses.dataclass
class FitSetup:
    """What a per-person fit over the training pool needs: the frozen UNet and scheduler, the pool of `people`, the
    frozen HyperLoRA, each used image's frozen Base coefficients and each person's row."""

    unet: nn.Module
    scheduler: DDPMScheduler
    data: TrainingSet
    model: nn.Module
    base: torch.Tensor  # [used images, Q, K]
    base_rows: torch.Tensor  # training-set index -> row of `base`
    row_of: torch.Tensor  # person id -> row of the fitted table (-1: not fitted)
    vae: nn.Module | None = None  # the frozen VAE (the identity loss decodes through it)

    @classmethod
    def load(cls, checkpoint: str, cache: str, people: list[int], *, pipeline: str = "data/toy/sdxl",
             world: str = "toy") -> FitSetup:  # fmt: skip
        pipe = load_base_pipeline(pipeline, world)  # the frozen base model the checkpoint was trained over
        unet = pipe.unet.requires_grad_(False).eval()
        data, _ = TrainingSet.load(Path(cache) / TRAINING_SET_FILE)
        data = pool_of(data, people)
        model = load_checkpoint(checkpoint, unet=unet, dtype=torch.float32).requires_grad_(False).eval()
        used = data.valid.nonzero().squeeze(1)  # the Base coefficients of the pool's images only
        base_rows = torch.zeros(len(data), dtype=torch.long)
        base_rows[used] = torch.arange(len(used))
        row_of = torch.full((int(data.person.max()) + 1,), -1, dtype=torch.long)
        row_of[torch.tensor(people)] = torch.arange(len(people))
        return cls(unet, DDPMScheduler.from_config(pipe.scheduler.config), data, model,
                   base_coefficient_table(model, data.clip_base[used]), base_rows, row_of,
                   pipe.vae.requires_grad_(False).eval())  # fmt: skip


def fit_rows(setup: FitSetup, generator: nn.Module, optimizer, out: Path, save, *, steps: int, done: int, looks: int,
             face_loss_weight: float, seed: int, desc: str = "fit rows", progress: bool = True,
             id_loss_weight: float = 0.0, id_recognizer: str = "", id_loss_path_steps: int = 0) -> None:  # fmt: skip
    """The fit loop: stage 3's case (a) loss over batches of `looks` looks per person, each person's row of
    `generator` (its `rows` set per batch) making their ID-LoRA; OUT/log.jsonl every 20 steps, `save(step)` every
    SAVE_EVERY. Resumed runs pass `done`: the batches continue by step and later log lines are dropped. With
    `id_loss_weight`, the identity loss of `hyperlora.train.identity_loss` is added (recogniser `id_recognizer`),
    on sampling paths of `id_loss_path_steps` steps if that is not 0 (the toy world's face detector finds the faces:
    these diagnostics read the toy training pool)."""
    if done and (out / "log.jsonl").is_file():  # the lines logged after the saved rows are logged again
        kept = [line for line in (out / "log.jsonl").read_text().splitlines() if json.loads(line)["step"] <= done]
        (out / "log.jsonl").write_text("".join(f"{line}\n" for line in kept))
    stage = StageConfig(stage=3, case_probs=(1.0, 0.0, 0.0), targets_per_reference=looks,
                        face_loss_weight=face_loss_weight, id_loss_weight=id_loss_weight,
                        id_loss_path_steps=id_loss_path_steps)  # fmt: skip
    run = TrainConfig(batch_size=16)
    data, others = setup.data, setup.data.others()
    identity = None
    if id_loss_weight:
        identity = load_identity_term(id_recognizer, setup.vae, empty=(data.empty_embeds, data.empty_pooled),
                                      path_faces=("toy", run.faces) if id_loss_path_steps else None)  # fmt: skip
    began = time.perf_counter()
    with open(out / "log.jsonl", "a") as log:
        for step in tqdm(range(done, steps), initial=done, total=steps, desc=desc, disable=not progress):
            rng = torch.Generator().manual_seed(step_seed(seed, 3, step, 0, 0))
            batch = sample_batch(data, others, stage, run, rng)
            batch["base_coefficients"] = setup.base[setup.base_rows[batch["index"]]]
            generator.rows = setup.row_of[batch["person"]]
            loss, stats = stage_loss(generator, setup.unet, setup.scheduler, batch, stage, snr_gamma=run.snr_gamma,
                                     rng=rng, has_base=True, identity=identity)  # fmt: skip
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if (step + 1) % 20 == 0:
                seconds = round(time.perf_counter() - began, 1)
                extra = {k: stats[k] for k in ("loss_id", "id_faces_found") if k in stats}
                log.write(json.dumps({"step": step + 1, "loss": float(loss), "s": seconds, **extra}) + "\n")
                log.flush()
            if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
                save(step + 1)


def fit_table(checkpoint: str, cache: str, people: list[int], out: str | Path, *, steps: int = 1600, lr: float = 3e-2,
              looks: int = 4, face_loss_weight: float = 9.0, seed: int = 0, pipeline: str = "data/toy/sdxl",
              world: str = "toy", progress: bool = True) -> Path:  # fmt: skip
    """Fit one row of ID tokens per person (see the module docstring); writes OUT/table.safetensors, OUT/log.jsonl.
    Rows start at the resampler's coefficients of the person's first look. Resumes from OUT's table if present."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    setup = FitSetup.load(checkpoint, cache, people, pipeline=pipeline, world=world)
    first = first_images(setup.data, people)
    with torch.no_grad():
        start = setup.model.id_coefficients(clip=setup.data.clip_id[first].float(),
                                            arcface=setup.data.arcface[first].float())  # fmt: skip
    generator = TableGenerator(setup.model, start)
    optimizer = torch.optim.SparseAdam(generator.table.parameters(), lr=lr)
    done = 0
    if (out / TABLE_FILE).is_file():  # resume: the rows and Adam's moments as saved (the batches continue by step)
        saved = load_file(str(out / TABLE_FILE))
        generator.table.weight.data.copy_(saved["raw"])
        state = {k: saved[f"adam.{k}"] for k in ("exp_avg", "exp_avg_sq")}
        optimizer.state[generator.table.weight] = {"step": int(saved["adam.step"]), **state}
        done = int(saved["done"])

    def save(step: int) -> None:
        _save_table(out, generator, optimizer, people, start, step, checkpoint)

    fit_rows(setup, generator, optimizer, out, save, steps=steps, done=done, looks=looks,
             face_loss_weight=face_loss_weight, seed=seed, progress=progress)  # fmt: skip
    return out / TABLE_FILE


def _save_table(out: Path, generator: TableGenerator, optimizer, people, start, done: int, checkpoint: str) -> None:
    state = optimizer.state.get(generator.table.weight, {})
    tensors = {"people": torch.tensor(people), "tokens": generator.tokens(torch.arange(len(people))).detach(),
               "start": start, "raw": generator.table.weight.detach(), "done": torch.tensor(done),
               **{f"adam.{k}": torch.as_tensor(v) for k, v in state.items()}}  # fmt: skip
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / f"{TABLE_FILE}.tmp"),
              metadata={"checkpoint": checkpoint})  # fmt: skip
    (out / f"{TABLE_FILE}.tmp").replace(out / TABLE_FILE)


def load_tables(folders: list[str]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(people [P], fitted tokens [P, Q, K], the resampler's starting tokens [P, Q, K]) of several fit folders."""
    parts = [load_file(str(Path(f) / TABLE_FILE)) for f in folders]
    return tuple(torch.cat([p[k] for p in parts]) for k in ("people", "tokens", "start"))


def row_cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean per-token cosine of [N, Q, K] against [N, Q, K], per row -> [N] (the distillation loss; for one number,
    `eval.lora_geometry.token_cosine`)."""
    return F.cosine_similarity(a, b, dim=-1).mean(-1)


def between(tokens: torch.Tensor) -> float:
    """Mean per-token cosine between different rows (each row its own person)."""
    return coefficient_cosine(tokens, torch.arange(len(tokens)))


def distill(checkpoint: str, cache: str, tables: list[str], out: str | Path, *, val_people: int = 16, steps: int = 3000,
            lr: float = 1e-3, batch_size: int = 64, seed: int = 0, progress: bool = True) -> dict:  # fmt: skip
    """Train the resampler's paths to predict each fitted person's row from any of their looks' features; the last
    `val_people` rows are held out. Writes OUT/model (float32), OUT/hyperlora (fp16), OUT/log.jsonl, OUT/summary.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    people, targets, start = load_tables(tables)
    if not 0 < val_people < len(people):
        raise ValueError(f"--val-people {val_people}: keep some of the {len(people)} fitted people on each side")
    data, _ = TrainingSet.load(Path(cache) / TRAINING_SET_FILE)
    model = load_checkpoint(checkpoint, dtype=torch.float32)
    params = select_trainable(model, RESAMPLER_GROUPS)
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-2)
    row_of = {int(p): i for i, p in enumerate(people)}
    images = [i for i in data.valid.nonzero().squeeze(1).tolist() if int(data.person[i]) in row_of]
    rows = torch.tensor([row_of[int(data.person[i])] for i in images])
    images = torch.tensor(images)
    train = rows < len(people) - val_people
    summary = {"people": len(people), "val_people": val_people, "fitted_from_start": float(row_cosine(targets, start).mean()),
               "between_fitted": between(targets), "between_start": between(start),
               "val_to_train_mean": float(row_cosine(targets[-val_people:],
                                                       F.normalize(targets[:-val_people].mean(0, keepdim=True), dim=-1)
                                                       .expand(val_people, -1, -1)).mean())}  # fmt: skip

    def score(mask: torch.Tensor) -> tuple[float, float]:
        with torch.no_grad():
            chosen = images[mask]
            predicted = model.id_coefficients(clip=data.clip_id[chosen].float(), arcface=data.arcface[chosen].float())
        return float(row_cosine(predicted, targets[rows[mask]]).mean()), between(predicted)

    generator = torch.Generator().manual_seed(seed)
    train_index = train.nonzero().squeeze(1)
    with open(out / "log.jsonl", "w") as log:
        for step in tqdm(range(steps + 1), desc="distill", disable=not progress):
            if step % 250 == 0 or step == steps:
                (tr, tr_between), (va, va_between) = score(train), score(~train)
                line = {"step": step, "train_cosine": tr, "val_cosine": va, "val_between": va_between,
                        "train_between": tr_between}  # fmt: skip
                log.write(json.dumps(line) + "\n")
                log.flush()
                summary.setdefault("start", line)
                summary["end"] = line
            if step == steps:
                break
            pick = train_index[torch.randint(len(train_index), (batch_size,), generator=generator)]
            augmented = torch.rand(batch_size, generator=generator) < 0.5  # the flipped, jittered copy half the time
            chosen = images[pick]
            clip = torch.where(augmented[:, None, None], data.clip_id_aug[chosen], data.clip_id[chosen]).float()
            arcface = torch.where(augmented[:, None], data.arcface_aug[chosen], data.arcface[chosen]).float()
            predicted = model.id_coefficients(clip=clip, arcface=arcface)
            loss = (1 - row_cosine(predicted, targets[rows[pick]])).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    extra = {"distilled_from": [str(t) for t in tables], "checkpoint": checkpoint, "steps": steps, "lr": lr}
    save_result(model, out, extra, summary)
    return summary


def save_result(model, out: Path, extra: dict, summary: dict) -> None:
    """A diagnostic's HyperLoRA as OUT/model (float32, a start for training) and OUT/hyperlora (fp16, for
    `eval.run --checkpoint`), with `extra` in both configs, and its figures as OUT/summary.json."""
    save_hyperlora(model, out / "model", extra=extra)
    save_hyperlora(model, out / "hyperlora", dtype=torch.float16, extra=extra)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m eval.coefficient_targets", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("fit", "distill"):
        p = sub.add_parser(name)
        p.add_argument("--checkpoint", required=True, help="the HyperLoRA whose bases (and resampler) are used")
        p.add_argument("--cache", default="runs/train/toy_v1/cache/train-62b5f0b2d4a48a9d",
                       help="a training pool folder holding training_set.safetensors: a toy pool, or an sdxl folder "
                            "made by `python -m hyperlora.train prepare`")  # fmt: skip
        p.add_argument("--out", required=True)
        p.add_argument("--steps", type=int, default=1600 if name == "fit" else 3000)
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--threads", type=int, default=1)
    fit, dist = sub.choices["fit"], sub.choices["distill"]
    fit.add_argument("--people", required=True, help="training people: 'a:b' or '1,2,3'")
    fit.add_argument("--lr", type=float, default=3e-2)
    fit.add_argument("--looks", type=int, default=4, help="looks of one person per batch sharing its row")
    fit.add_argument("--world", choices=("toy", "sdxl"), default="toy")
    fit.add_argument("--pipeline", default="data/toy/sdxl", help="the frozen base model (a diffusers SDXL folder)")
    dist.add_argument("--tables", nargs="+", required=True, help="fit folders")
    dist.add_argument("--val-people", type=int, default=16)
    dist.add_argument("--lr", type=float, default=1e-3)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    if not (Path(args.cache) / TRAINING_SET_FILE).is_file():
        parser.error(f"--cache {args.cache}: no {TRAINING_SET_FILE} (a pool made by `python -m hyperlora.train`)")
    if args.command == "fit":
        fit_table(args.checkpoint, args.cache, parse_people(args.people), args.out, steps=args.steps, lr=args.lr,
                  looks=args.looks, seed=args.seed, pipeline=args.pipeline, world=args.world)  # fmt: skip
    else:
        summary = distill(args.checkpoint, args.cache, args.tables, args.out, val_people=args.val_people,
                          steps=args.steps, lr=args.lr, seed=args.seed)  # fmt: skip
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
