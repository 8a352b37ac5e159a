"""Resumable checkpoints on HF accelerate, shared by the hypernetwork loop and the toy UNet trainer.

A run folder's `checkpoints/step-N` holds accelerate's state (weights, optimiser, LR schedule, RNG and
every object registered with `register_for_checkpointing`); `step.json` is written last, so a folder
without it (a run killed while saving) is never resumed from.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from accelerate import Accelerator

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
