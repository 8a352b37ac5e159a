"""Training HyperLoRA: the paper's three stages in one loop (config, data, params, losses, loop, CLI)."""

from .config import RunConfig, StageConfig, TrainConfig, resolve
from .loop import train_schedule, train_stage

__all__ = ["RunConfig", "StageConfig", "TrainConfig", "resolve", "train_schedule", "train_stage"]
