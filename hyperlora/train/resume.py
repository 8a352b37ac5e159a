"""Resumable checkpoints on HF accelerate, shared by the hypernetwork loop and the toy UNet trainer.

A run folder's `checkpoints/step-N` holds accelerate's state (weights, optimiser, LR schedule, RNG and
every object registered with `register_for_checkpointing`); `step.json` is written last, so a folder
without it (a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

STEP_FILE = "step.json"


def latest_checkpoint(out: Path) -> tuple[Path, int] | None:
    """The newest complete `checkpoints/step-N` folder of a run and its step, or None."""
    found = sorted((int(p.name.split("-")[1]), p) for p in (Path(out) / "checkpoints").glob("step-*")
                   if (p / STEP_FILE).is_file())  # fmt: skip
    return (found[-1][1], found[-1][0]) if found else None


def save_checkpoint(accelerator: Accelerator, out: Path, step: int, keep: int) -> None:
    """Save the state at `step` and keep only the newest `keep` checkpoints."""
    folder = Path(out) / "checkpoints" / f"step-{step}"
    accelerator.save_state(str(folder))
    if accelerator.is_main_process:
        (folder / STEP_FILE).write_text(json.dumps({"step": step}) + "\n")  # written last: the state is complete
        for old in sorted((Path(out) / "checkpoints").glob("step-*"), key=lambda p: int(p.name.split("-")[1]))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()


class GeneratorState:
    """A torch.Generator as a checkpointable object (`accelerator.register_for_checkpointing` needs
    state_dict / load_state_dict): a trainer that draws batches from one generator resumes bit for bit."""

    def __init__(self, generator: torch.Generator):
        self.generator = generator

    def state_dict(self) -> dict:
        return {"state": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["state"])


CURVE_FILE = "losses.json"  # a run's loss curve: one mean per logging window (also inside each checkpoint)


def curve_sessions(curve: list[dict]) -> list[list[dict]]:
    """A resumed loss curve split by the session that logged each point (`seconds` restart at every session).
    Points without `session` (curves from before it was recorded) start a new session where `seconds` falls."""
    sessions: list[list[dict]] = []
    for point in curve:
        new = not sessions or (point["session"] != sessions[-1][-1].get("session") if "session" in point
                               else point["seconds"] < sessions[-1][-1]["seconds"])  # fmt: skip
        if new:
            sessions.append([])
        sessions[-1].append(point)
    return sessions


def curve_seconds(curve: list[dict]) -> float:
    """Training seconds over every session of a resumed loss curve: each session's last logged `seconds` (the time
    a killed session ran after its last checkpoint is lost with it)."""
    return float(sum(points[-1]["seconds"] for points in curve_sessions(curve)))


def run_logged_steps(step_fn, *, accelerator: Accelerator, out: Path, total: int, log_every: int,
                     checkpoint_every: int, keep: int, resume: bool, desc: str, progress: bool,
                     logger) -> tuple[list[dict], float, int]:  # fmt: skip
    """Steps 1..total of a single-model trainer (the toy UNet, the toy ControlNet), resumed from the newest
    checkpoint with `resume`: `step_fn()` runs one optimiser step and returns its loss. Logs a loss curve point
    every `log_every` steps and saves a resumable checkpoint (with the curve so far) every `checkpoint_every`.
    Returns (the loss curve, seconds this session, the first step run this session)."""
    out = Path(out)
    curve, window, start, first = [], [], time.perf_counter(), 1
    latest = latest_checkpoint(out) if resume else None
    if latest is not None:
        accelerator.load_state(str(latest[0]))
        curve = json.loads((latest[0] / CURVE_FILE).read_text())
        first = latest[1] + 1
        logger.info("resumed %s at step %d", out, latest[1])
    session = len(curve_sessions(curve))  # this session's index: its points' `seconds` count from its start
    bar = tqdm(range(first, total + 1), initial=first - 1, total=total, desc=desc,
               disable=not progress or not accelerator.is_main_process)  # fmt: skip
    for step in bar:
        window.append(step_fn().item())
        if step % log_every == 0 or step == total:
            elapsed = time.perf_counter() - start
            curve.append({"step": step, "loss": sum(window) / len(window), "seconds": round(elapsed, 1),
                          "session": session})  # fmt: skip
            logger.info("step %d/%d loss %.4f (%.2f steps/s)", step, total, curve[-1]["loss"],
                        (step - first + 1) / elapsed)  # fmt: skip
            bar.set_postfix(loss=f"{curve[-1]['loss']:.4f}")
            window = []
        if checkpoint_every and step % checkpoint_every == 0 and step < total:
            save_checkpoint(accelerator, out, step, keep)
            (out / "checkpoints" / f"step-{step}" / CURVE_FILE).write_text(json.dumps(curve) + "\n")
    return curve, time.perf_counter() - start, first
