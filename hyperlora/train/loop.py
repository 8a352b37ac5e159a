"""The training loop: one stage of the schedule on HF accelerate, resumable exactly; and the whole schedule.

A stage's run folder holds
    config.json        the resolved RunConfig, the command line, the git commit
    log.jsonl          one line per `log_every` steps: loss, per-case losses, lr, grad norm, images/s
    val.jsonl          validation: case (a) loss with the right reference against a shuffled one
    checkpoints/step-N accelerate's resumable state (weights, AdamW, LR schedule, EMA, RNG), the newest kept
    model/             the trained hypernetwork in the official four-file layout, float32 (the next stage's start)
    hyperlora/         the same in `export_dtype` (what users load: `hyperlora.checkpoint.load_checkpoint`)
    done.json          written last: steps, seconds (every session's, from the log; `logged_seconds`) and the
                       seconds of the last session; a stage with it is complete
Batches depend only on (seed, stage, step, micro-step, process), so `--resume` continues bit for bit.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers import DDPMScheduler, StableDiffusionXLPipeline
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from ..checkpoint import load_checkpoint
from ..checkpoint import save_checkpoint as save_hyperlora
from ..conditioning.backends import make_face_analyzer
from ..hypernet import HyperLoRA
from ..targets import find_targets
from ..toy.cards import git_commit
from .config import RunConfig
from .data import TRAINING_SET_FILE, TrainingSet, fixed_batch, sample_batch, step_seed
from .losses import IdentityTerm, LoRAGenerator, base_coefficient_table, reference_gap, stage_loss
from .params import optimizer_groups, select_trainable, zero_new_paths
from .resume import latest_checkpoint, save_checkpoint

logger = logging.getLogger(__name__)

DONE_FILE = "done.json"
SCHEDULE_FILE = "schedule.json"  # a schedule folder's stage folders, in training order
BASE_TABLE_MAX_BYTES = 8 * 2**30  # the CPU memory the stages 2-3 table of Base coefficients may take (per process)


def load_base_pipeline(path: str, world: str) -> StableDiffusionXLPipeline:
    """The frozen base model (float32; the toy folder stores float16 weights)."""
    if world == "toy":
        from ..toy.pipeline import load_toy_pipeline

        return load_toy_pipeline(path)
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"--pipeline {path!r}: not a diffusers SDXL pipeline folder (no model_index.json)")
    return StableDiffusionXLPipeline.from_pretrained(path, dtype=torch.float32)


def load_training_sets(config: RunConfig, pipe, cache_dir: Path, progress: bool) -> tuple[TrainingSet, TrainingSet | None]:
    """The training set (and the validation set, toy world): a prepared folder, or the toy world's rendered pool."""
    run = config.run
    if run.data:
        path = Path(run.data) / TRAINING_SET_FILE
        if not path.is_file():
            raise FileNotFoundError(f"--data {run.data}: no {TRAINING_SET_FILE}; make it with `python -m hyperlora.train prepare`")
        data, _ = TrainingSet.load(path)
        val = None
        if (Path(run.data) / "val" / TRAINING_SET_FILE).is_file():
            val, _ = TrainingSet.load(Path(run.data) / "val" / TRAINING_SET_FILE)
        return data, val
    from ..conditioning.clip_features import ClipImageEncoder
    from ..conditioning.references import Conditioner
    from ..toy.face_backend import ToyFaceAnalyzer
    from .data import toy_training_set

    # the training renders hold one person each: the several-faces window scan (which doubles the cost of an
    # encoded image, 20 -> 42 ms) finds the same box on them, so the pool skips it
    analyzer = ToyFaceAnalyzer(model_dir=run.faces, scan_windows=False)
    conditioner = Conditioner(analyzer, ClipImageEncoder(run.clip, world="toy"), with_base=True, min_face_size=8.0)
    words = config.model.trigger_words
    data = toy_training_set(run, pipe, conditioner, words, cache_dir, progress=progress)
    val = None
    if run.val_every:
        val = toy_training_set(run, pipe, conditioner, words, cache_dir, split="val", num_identities=run.val_identities,
                               progress=progress)  # fmt: skip
    return data, val


def build_model(config: RunConfig, unet, init: Path | None) -> HyperLoRA:
    """A fresh hypernetwork (seeded), or the previous stage's; the ArcFace path starts closed until stage 3."""
    if init is None:
        model = HyperLoRA(config.model, find_targets(unet))
        zero_new_paths(model)
        return model
    # float32 master weights whatever the file holds: a shipped fp16 checkpoint trained as fp16 goes NaN within
    # 20 steps (mixed precision casts the forward, never the AdamW state)
    model = load_checkpoint(init, unet=unet, dtype=torch.float32)
    if model.config != config.model:
        theirs, ours = model.config.to_dict(), config.model.to_dict()
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        raise ValueError(f"{init}: its hypernetwork differs from this run's (checkpoint, run): {diff}")
    return model


def _truncate_logs(out: Path, step: int) -> None:
    """Drop the log lines written after the checkpoint a run resumes from: they are written again."""
    for name in ("log.jsonl", "val.jsonl"):
        path = out / name
        if path.is_file():
            lines = [line for line in path.read_text().splitlines() if json.loads(line)["step"] <= step]
            path.write_text("".join(line + "\n" for line in lines))


def logged_seconds(out: str | Path, up_to: int | None = None) -> float:
    """A stage's training seconds over every session that ran it (up to step `up_to`): the sum of its log windows,
    each window's images over its images/s (validation and checkpoints included; model loading not)."""
    config = json.loads((Path(out) / "config.json").read_text())
    run = config["run"]
    per_step = run["batch_size"] * run["grad_accum"] * config.get("num_processes", 1)
    total, previous = 0.0, 0
    for text in (Path(out) / "log.jsonl").read_text().splitlines():
        line = json.loads(text)
        if up_to is not None and line["step"] > up_to:
            break
        total += (line["step"] - previous) * per_step / line["images_per_s"]
        previous = line["step"]
    return total


def _to(batch: dict, device) -> dict:
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}


@dataclass
class Trainer:
    """One stage, set up: the frozen base model, the data, the prepared hypernetwork and its optimiser."""

    config: RunConfig
    accelerator: Accelerator
    unet: torch.nn.Module
    scheduler: DDPMScheduler  # the base model's noise schedule and prediction type
    data: TrainingSet
    others: list[torch.Tensor]
    val: TrainingSet | None
    module: torch.nn.Module  # LoRAGenerator, prepared (DDP-wrapped with several processes)
    params: list[torch.nn.Parameter]  # what this stage trains
    optimizer: torch.optim.Optimizer
    schedule: torch.optim.lr_scheduler.LRScheduler
    ema: EMAModel | None
    base_table: torch.Tensor | None = None  # stages 2-3: the frozen Base coefficients of every training image
    identity: IdentityTerm | None = None  # the identity loss's frozen recogniser and VAE (StageConfig.id_loss_weight)

    @property
    def has_base(self) -> bool:
        return self.accelerator.unwrap_model(self.module).hyperlora.config.has_base_lora

    def step(self, step: int) -> dict:
        """Optimiser step `step` (0-based): grad_accum micro-batches of the stage loss, clipping, AdamW, the LR
        schedule, EMA. Its batches depend only on (seed, stage, step, micro-step, process). Returns log values."""
        run, stage, accelerator = self.config.run, self.config.stage, self.accelerator
        for micro in range(run.grad_accum):
            rng = torch.Generator().manual_seed(step_seed(run.seed, stage.stage, step, micro, accelerator.process_index))
            batch = sample_batch(self.data, self.others, stage, run, rng)
            if self.base_table is not None:
                batch["base_coefficients"] = self.base_table[batch["index"]]
            batch = _to(batch, accelerator.device)
            last = micro == run.grad_accum - 1
            with accelerator.no_sync(self.module) if not last else contextlib.nullcontext():
                with accelerator.autocast():
                    loss, stats = stage_loss(self.module, self.unet, self.scheduler, batch, stage, rng=rng,
                                             snr_gamma=run.snr_gamma, has_base=self.has_base,
                                             identity=self.identity)  # fmt: skip
                accelerator.backward(loss / run.grad_accum)
        grad_norm = accelerator.clip_grad_norm_(self.params, run.grad_clip)
        self.optimizer.step()
        self.schedule.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.step(self.params)
        return {"loss": float(loss.detach()), **stats, "grad_norm": float(grad_norm)}


def load_identity_term(recognizer: str, vae, device=None, *, path_faces: tuple[str, str] | None = None,
                       empty: tuple[torch.Tensor, torch.Tensor] | None = None) -> IdentityTerm:  # fmt: skip
    """The identity loss's frozen parts: the box-crop recogniser in file `recognizer` and the base model's VAE; for
    the sampling-path form also the face analyser that finds the sampled faces, `path_faces` = (world, model
    folder), and the "" prompt's embeddings `empty` for its unconditional branch."""
    if not recognizer:
        raise ValueError("id_loss_weight > 0 needs --id-recognizer: a recogniser trained on box crops "
                         "(python -m hyperlora.toy.faces --stages recognizer --recognizer.crop '\"box\"')")  # fmt: skip
    # one recogniser format for both worlds (TrainConfig.id_recognizer: no differentiable antelopev2 ships)
    from ..toy.face_recognizer import load_box_embedder

    vae = vae.requires_grad_(False).eval().to(device)
    analyzer = None
    if path_faces is not None:  # each world's own detector: the toy ONNX one, or antelopev2's from its root
        world, faces = path_faces
        analyzer = (make_face_analyzer("toy", model_dir=faces, scan_windows=False) if world == "toy"
                    else make_face_analyzer("antelopev2", root=faces))  # fmt: skip
    return IdentityTerm(load_box_embedder(recognizer).to(device), vae, analyzer, empty)


def setup_stage(config: RunConfig, *, init: str | Path | None = None, cache_dir: str | Path,
                progress: bool = True) -> Trainer:  # fmt: skip
    """Load the frozen parts and the data, build (or load) the hypernetwork, freeze what the stage does not own."""
    run, stage = config.run, config.stage
    torch.set_num_threads(run.threads)
    accelerator = Accelerator(mixed_precision=run.mixed_precision)
    pipe = load_base_pipeline(run.pipeline, run.world)
    unet = pipe.unet.requires_grad_(False).eval().to(accelerator.device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    with accelerator.main_process_first():  # the main process builds the cache, the others read it
        data, val = load_training_sets(config, pipe, Path(cache_dir), progress)
    set_seed(run.seed)
    model = build_model(config, unet, Path(init) if init else None)
    if stage.stage == 1 and not model.config.has_base_lora:
        raise ValueError("stage 1 trains the Base-LoRA: the hypernetwork needs has_base_lora=True")
    params = select_trainable(model, stage.groups)
    module = LoRAGenerator(model).to(accelerator.device)
    groups = optimizer_groups(model, params, stage.lr, stage.basis_lr_scale)
    optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=run.weight_decay)
    n = accelerator.num_processes  # accelerate steps a prepared LR schedule once per process
    schedule = get_scheduler(stage.lr_schedule, optimizer, num_warmup_steps=stage.warmup_steps * n,
                             num_training_steps=stage.steps * n)  # fmt: skip
    module, optimizer, schedule = accelerator.prepare(module, optimizer, schedule)
    ema = EMAModel(params, decay=run.ema_decay) if run.ema_decay > 0 else None
    if ema is not None:
        accelerator.register_for_checkpointing(ema)
    base_table = None
    if stage.stage > 1 and stage.base_in_id_stages and model.config.has_base_lora and "base" not in stage.groups:
        size = len(data) * model.base_resampler.num_queries * model.config.hyper_dim * 4
        if size <= BASE_TABLE_MAX_BYTES:
            base_table = base_coefficient_table(model, data.clip_base, device=accelerator.device,
                                                autocast=accelerator.autocast)  # fmt: skip
        else:
            logger.info("Base coefficients of %d images would take %.1f GB: the Base resampler runs per batch instead",
                        len(data), size / 1e9)  # fmt: skip
    identity = None
    if stage.stage > 1 and stage.id_loss_weight:
        identity = load_identity_term(run.id_recognizer, pipe.vae, accelerator.device,
                                      path_faces=(run.world, run.faces) if stage.id_loss_path_steps else None,
                                      empty=(data.empty_embeds, data.empty_pooled))  # fmt: skip
    return Trainer(config, accelerator, unet, scheduler, data, data.others(), val, module, params, optimizer,
                   schedule, ema, base_table, identity)  # fmt: skip


def _log_line(window: list[dict], step: int, seconds: float, trainer: Trainer) -> dict:
    run = trainer.config.run
    images = len(window) * run.batch_size * run.grad_accum * trainer.accelerator.num_processes
    line = {"step": step, "lr": trainer.schedule.get_last_lr()[0], "images_per_s": images / seconds}
    for key in {k for w in window for k in w}:
        values = [w[key] for w in window if key in w]
        line[key] = sum(values) / len(values)
    return line


def train_stage(config: RunConfig, out_dir: str | Path, *, init: str | Path | None = None, resume: bool = False,
                cache_dir: str | Path | None = None, progress: bool = True, command: list[str] | None = None) -> Path:  # fmt: skip
    """Train one stage into `out_dir` (see the module docstring); returns `out_dir / "model"`."""
    run, stage, out = config.run, config.stage, Path(out_dir)
    latest = latest_checkpoint(out) if resume else None
    if not resume and (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a run: pass --resume to continue it, or another --out")
    cache_dir = cache_dir or run.cache_dir or out.parent / "cache"
    trainer = setup_stage(config, init=init, cache_dir=cache_dir, progress=progress)
    accelerator, main = trainer.accelerator, trainer.accelerator.is_main_process
    if main:
        out.mkdir(parents=True, exist_ok=True)
        record = {**config.to_dict(), "command": command or sys.argv, "git_commit": git_commit(),
                  "init": str(init) if init else None, "num_processes": accelerator.num_processes}  # fmt: skip
        (out / "config.json").write_text(json.dumps(record, indent=2) + "\n")
    start = 0
    if latest is not None:
        accelerator.load_state(str(latest[0]))
        start = latest[1]
        if main:
            _truncate_logs(out, start)
        logger.info("resumed %s at step %d", out, start)
    val = trainer.val
    val_batch = fixed_batch(val, val.others(), stage, run, size=64, seed=run.seed) if val is not None else None
    log = open(out / "log.jsonl", "a") if main else None
    bar = tqdm(range(start, stage.steps), initial=start, total=stage.steps, desc=f"stage {stage.stage}",
               disable=not (progress and main), mininterval=2)  # fmt: skip
    window, clock, began = [], time.perf_counter(), time.perf_counter()
    for step in bar:
        window.append(trainer.step(step))
        done = step + 1
        if main and (done % run.log_every == 0 or done == stage.steps):
            line = _log_line(window, done, time.perf_counter() - clock, trainer)
            log.write(json.dumps(line) + "\n")
            log.flush()
            bar.set_postfix(loss=f"{line['loss']:.4f}")
            window, clock = [], time.perf_counter()
        if main and val_batch is not None and run.val_every and (done % run.val_every == 0 or done == stage.steps):
            gap = reference_gap(accelerator.unwrap_model(trainer.module), trainer.unet, trainer.scheduler,
                                _to(val_batch, accelerator.device), stage, rng_seed=run.seed, has_base=trainer.has_base)  # fmt: skip
            with open(out / "val.jsonl", "a") as f:
                f.write(json.dumps({"step": done, **gap}) + "\n")
        if done % run.checkpoint_every == 0 or done == stage.steps:
            save_checkpoint(accelerator, out, done, run.keep_checkpoints)
    if log is not None:
        log.close()
    return _export(trainer, out, time.perf_counter() - began, start, init)


def _export(trainer: Trainer, out: Path, seconds: float, start: int, init) -> Path:
    """The trained hypernetwork in the official layout (float32 and export dtype) and done.json."""
    accelerator, config = trainer.accelerator, trainer.config
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(trainer.module).hyperlora
    if trainer.ema is not None:
        trainer.ema.copy_to(trainer.params)
    digest = hashlib.sha256(b"".join(p.detach().cpu().numpy().tobytes() for p in model.parameters())).hexdigest()
    (out / "processes").mkdir(exist_ok=True)  # every process's weights, so a data-parallel run can be checked
    (out / "processes" / f"rank{accelerator.process_index}.json").write_text(json.dumps({"weights_sha256": digest}) + "\n")
    if accelerator.is_main_process:
        extra = {"run_config": config.to_dict(), "git_commit": git_commit(), "init": str(init) if init else None,
                 "stage": config.stage.stage, "steps": config.stage.steps}  # fmt: skip
        save_hyperlora(model, out / "model", extra=extra)
        save_hyperlora(model, out / "hyperlora", dtype=getattr(torch, config.run.export_dtype), extra=extra)
        done = {"stage": config.stage.stage, "steps": config.stage.steps, "seconds": round(logged_seconds(out), 1),
                "seconds_this_session": round(seconds, 1), "resumed_from_step": start}  # fmt: skip
        (out / DONE_FILE).write_text(json.dumps(done, indent=2) + "\n")
    accelerator.wait_for_everyone()
    return out / "model"


def train_schedule(configs: list[RunConfig], out_dir: str | Path, *, init: str | Path | None = None,
                   resume: bool = False, progress: bool = True, command: list[str] | None = None,
                   phases: list[str] | None = None) -> Path:  # fmt: skip
    """Stages in order, each in `out_dir/stage{N}` (or `stage{phase}` for a labelled phase, "3-path") starting from
    the previous stage's model; `out_dir/schedule.json` lists the folders in order (`train.ship` reads it). With
    `resume`, complete stages are skipped and an interrupted one continues from its newest checkpoint."""
    out = Path(out_dir)
    phases = [str(p) for p in phases] if phases else [str(c.stage.stage) for c in configs]
    if len(phases) != len(configs) or len(set(phases)) < len(phases):
        raise ValueError(f"phases {phases}: one distinct name per stage config ({len(configs)})")
    if os.environ.get("RANK", "0") == "0":  # before any Accelerator exists: one writer
        out.mkdir(parents=True, exist_ok=True)
        (out / SCHEDULE_FILE).write_text(json.dumps({"folders": [f"stage{p}" for p in phases]}, indent=2) + "\n")
    previous = Path(init) if init else None
    for config, phase in zip(configs, phases):
        folder = out / f"stage{phase}"
        if resume and (folder / DONE_FILE).is_file():
            logger.info("stage %s already complete in %s", phase, folder)
        else:
            train_stage(config, folder, init=previous, resume=resume, cache_dir=config.run.cache_dir or out / "cache",
                        progress=progress,
                        command=command)  # fmt: skip
        previous = folder / "model"
    return previous
