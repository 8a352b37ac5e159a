"""Training configuration: one dataclass for the run, one per stage, JSON presets that hold only what differs.

A preset file (`hyperlora/train/presets/<name>.json`) has these optional sections (and "schedule", the phases
it runs by default, and "extends", a preset it starts from: `load_preset`):
    {"model": {HyperLoRAConfig fields}, "run": {TrainConfig fields}, "stages": {"1": {StageConfig fields}, ...}}
Everything not named there keeps the dataclass default below; unknown keys raise. A "stages" key may also name a
phase, "N-label" (for example "3-path"): stage N run with the plain "N" entry's values and then its own, so that
one schedule can run a stage twice in two settings (`--stages 1,3,3-path`). The resolved
configuration of a stage is written into every run folder and checkpoint, so a run reloads with
nothing else (STYLE rule 3).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from ..config import HyperLoRAConfig, strict_from_dict

STAGES = (1, 2, 3)
REFERENCE_MODES = ("self", "other")  # the target image augmented, or another photo of the same person
# Parameter groups of the hypernetwork (see `hyperlora.train.params`); a stage trains the groups it names.
PARAM_GROUPS = ("base", "id_basis", "resampler_core", "clip_path", "arcface_path")


@dataclass
class StageConfig:
    """What differs between the paper's three stages (facts §5.2); one loop runs them all."""

    stage: int = 1  # 1: Base-LoRA; 2: ID-LoRA from CLIP; 3: ID-LoRA with ArcFace, CLIP path frozen
    steps: int = 1000  # optimiser steps of this stage
    lr: float = 1e-4  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warmup, then `lr_schedule`
    lr_schedule: str = "cosine"  # a diffusers.optimization.get_scheduler name: cosine, constant, linear, ...
    basis_lr_scale: float = 1.0  # the basis banks train at lr x this, the resampler and encoders' paths at lr
    # (coef_ft finds the trained bases, not only the resampler, limiting identity: README, "Which link limits")
    train_groups: tuple[str, ...] = ()  # parameter groups trained (PARAM_GROUPS); empty: the stage's default
    id_inputs: tuple[str, ...] = ()  # ID-branch inputs ("clip", "arcface"); empty: stage 2 clip, stage 3 both
    # Stage 2-3 cases, drawn per sample: (a) trigger words + ID + Base -> the target image; (b) no trigger words,
    # ID alone -> the frozen base model's prediction; (c) no trigger words, ID + Base -> the Base-only prediction
    case_probs: tuple[float, float, float] = (0.5, 0.25, 0.25)
    reference: str = "other"  # "self": the target image augmented (the paper's single-image data); "other":
    # another image of the same person with another look (the toy world and multi-photo folders have them)
    targets_per_reference: int = 1  # stages 2-3: looks of one person that share one generated LoRA in a batch
    # (batch_size / this references per step): the resampler runs once per reference, the cost it dominates
    base_in_id_stages: bool = True  # stages 2-3 use the frozen Base-LoRA of stage 1 in cases (a) and (c);
    # False trains the ID-LoRA without it (the decoupling ablation: stages 2-3 only)
    face_loss_weight: float = 0.0  # the diffusion loss weighs 1 + this inside the detected face box (1 outside),
    # normalised per image: identity lives in the face, a small part of a portrait's pixels (a masked loss, as
    # kohya's sd-scripts `--masked_loss`). 0: the paper's plain loss (facts §5.2: "no extra regulariser")
    max_timestep: int = 0  # timesteps drawn from [0, this) instead of every training timestep: the lower-noise
    # steps, where a face's details are drawn, take the whole batch. 0: all (the paper's plain loss)
    id_loss_weight: float = 0.0  # stages 2-3 (stage 1 ignores it): + this x (1 - cosine) between a recogniser's
    # embeddings of the face the prediction implies and of the image's own face, on case (a) samples
    # (`train.identity_loss`; needs TrainConfig.id_recognizer). A departure from the paper (PuLID's identity
    # loss); 0: the paper's loss
    id_loss_max_timestep: int = 400  # the identity loss reads samples below this timestep only: the one-step x0
    # estimate of a noisier latent is too blurred to hold a face
    id_loss_path_steps: int = 0  # 0: the identity loss reads that one-step estimate. N > 0: PuLID's form instead,
    # a face sampled from pure noise along N DDIM steps, backpropagated through every step (N UNet passes of twice
    # id_loss_samples images a batch, at guidance id_loss_guidance)
    id_loss_guidance: float = 5.0  # the sampling path's classifier-free guidance (the evaluation harness's)
    id_loss_samples: int = 8  # sampling paths per batch: the first captioned case (a) sample of each person's group
    id_loss_views: int = 1  # the path's identity loss averages the cosine over this many random views of each face
    id_loss_jitter: float = 0.0  # of this strength (box moved and scaled, blurred, mirrored: `FaceEmbedder.views`),
    # so that a face change fooling the recogniser from one exact crop only does not pay. 0: the one exact crop
    id_decouple_weight: float = 0.0  # with id_loss_path_steps: + this x (1 - cosine) between the recogniser's
    # embeddings of the face sampled without trigger words (the first case b or c sample of each person's group)
    # and the face its teacher samples from the same noise (b: the base model; c: the Base-LoRA alone). The
    # paper's cases (b) and (c) asked of the sampling path, so that the identity loss's faces stay behind the
    # trigger words (a departure from the paper, as the identity loss). 0: off

    def __post_init__(self):
        self.train_groups, self.id_inputs = tuple(self.train_groups), tuple(self.id_inputs)
        self.case_probs = tuple(float(p) for p in self.case_probs)
        if self.stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {self.stage}")
        unknown = set(self.train_groups) - set(PARAM_GROUPS)
        if unknown:
            raise ValueError(f"unknown train_groups {sorted(unknown)}; groups: {PARAM_GROUPS}")
        if set(self.id_inputs) - {"clip", "arcface"}:
            raise ValueError(f"id_inputs must be a subset of ('clip', 'arcface'), got {self.id_inputs}")
        if len(self.case_probs) != 3 or min(self.case_probs) < 0 or abs(sum(self.case_probs) - 1) > 1e-6:
            raise ValueError(f"case_probs must be three non-negative probabilities summing to 1, got {self.case_probs}")
        if self.reference not in REFERENCE_MODES:
            raise ValueError(f"reference must be one of {REFERENCE_MODES}, got {self.reference!r}")
        if self.face_loss_weight < 0:
            raise ValueError(f"face_loss_weight must be >= 0, got {self.face_loss_weight}")
        if self.id_loss_weight < 0 or self.id_loss_max_timestep < 1:
            raise ValueError(f"id_loss_weight must be >= 0 and id_loss_max_timestep >= 1, got {self.id_loss_weight}, "
                             f"{self.id_loss_max_timestep}")  # fmt: skip
        if self.id_loss_path_steps < 0 or self.id_loss_samples < 1 or not self.id_loss_guidance >= 1:
            raise ValueError(f"id_loss_path_steps must be >= 0, id_loss_samples >= 1 and id_loss_guidance >= 1, got "
                             f"{self.id_loss_path_steps}, {self.id_loss_samples}, {self.id_loss_guidance}")  # fmt: skip
        if self.id_loss_views < 1 or not 0 <= self.id_loss_jitter < 0.5:
            raise ValueError(f"id_loss_views must be >= 1 and 0 <= id_loss_jitter < 0.5, got {self.id_loss_views}, "
                             f"{self.id_loss_jitter}")  # fmt: skip
        path_term = self.id_loss_path_steps and self.id_loss_weight
        if self.id_decouple_weight < 0 or (self.id_decouple_weight and not path_term):
            raise ValueError(f"id_decouple_weight must be >= 0 and needs id_loss_path_steps > 0 and id_loss_weight > 0, "
                             f"got {self.id_decouple_weight}, {self.id_loss_path_steps}, {self.id_loss_weight}")  # fmt: skip
        if self.max_timestep < 0:
            raise ValueError(f"max_timestep must be >= 0 (0: every training timestep), got {self.max_timestep}")
        if self.targets_per_reference < 1:
            raise ValueError(f"targets_per_reference must be >= 1, got {self.targets_per_reference}")
        if self.basis_lr_scale <= 0:
            raise ValueError(f"basis_lr_scale must be > 0, got {self.basis_lr_scale}")
        if self.steps < 1 or self.lr <= 0:
            raise ValueError(f"steps must be >= 1 and lr > 0, got steps={self.steps}, lr={self.lr}")

    @property
    def groups(self) -> tuple[str, ...]:
        """The groups this stage trains: stage 1 the Base branch, stage 2 the ID-LoRA's CLIP side and the shared
        resampler, stage 3 the ID-LoRA continuing with the ArcFace path (ID projector, proj_in, the ArcFace
        cross-attention) while the CLIP path stays frozen. Stage 3 once trained the ArcFace path alone (issue 17's
        wording; `--train-groups arcface_path`): with the bases frozen as stage 2 left them it cannot grow the
        ID-LoRA (gradient norm 5e-6, coefficients 0.99994 alike between people after 500 toy steps; README)."""
        return self.train_groups or {1: ("base",), 2: ("id_basis", "resampler_core", "clip_path"),
                                     3: ("id_basis", "resampler_core", "arcface_path")}[self.stage]  # fmt: skip

    @property
    def inputs(self) -> tuple[str, ...]:
        return self.id_inputs or {1: (), 2: ("clip",), 3: ("clip", "arcface")}[self.stage]


@dataclass
class TrainConfig:
    """The run: data, optimisation and runtime shared by every stage."""

    world: str = "toy"  # "toy" (rendered people, shipped models) or "sdxl" (a prepared folder dataset)
    data: str = ""  # sdxl: a folder made by `python -m hyperlora.train prepare`; toy: "" (rendered here)
    pipeline: str = "data/toy/sdxl"  # the frozen base model: a diffusers SDXL pipeline folder
    clip: str = "data/toy/clip"  # the CLIP vision encoder of the hypernetwork (toy CLIP or ViT-L/14)
    faces: str = "data/toy/faces"  # toy: the face models; sdxl: the insightface root holding antelopev2
    # Toy data: a pool of rendered train-split people, encoded once into the feature cache (`train.data`).
    num_identities: int = 2000  # train-split people in the pool (ids 0..n-1; never a val or test person)
    images_per_identity: int = 4  # looks per person; "other" references come from the same person's looks
    cache_dir: str = ""  # where the encoded training pools are cached; "": beside the run (RUN/cache)
    data_seed: int = 1  # render seed of the pool (the toy UNet trained on seed 0: other looks of its people)
    id_recognizer: str = ""  # the identity loss's recogniser (StageConfig.id_loss_weight): a safetensors file of
    # `hyperlora.toy.faces` trained on box crops (`--recognizer.crop '"box"'`), best another than the judge's.
    # Both worlds read this format; no differentiable antelopev2 ships (it is ONNX)
    # Optimisation.
    batch_size: int = 16  # per process, per accumulation step
    grad_accum: int = 1  # gradient accumulation steps per optimiser step
    grad_clip: float = 1.0  # max gradient norm of the trained parameters
    weight_decay: float = 1e-2
    caption_dropout: float = 0.1  # share of case-(a) prompts replaced by "" (the LoRA serves CFG's branch too)
    snr_gamma: float | None = 5.0  # Min-SNR weighting of the diffusion loss; None: plain MSE
    ema_decay: float = 0.0  # EMA of the trained parameters (0: off); the EMA weights are the ones exported
    # Runtime.
    mixed_precision: str = "no"  # accelerate: "no", "fp16", "bf16" (GPU)
    threads: int = 1  # torch CPU threads per process
    seed: int = 0  # init and the per-step batch generators (a step's batch depends on (seed, step, process) only)
    log_every: int = 20  # steps per JSONL log line
    checkpoint_every: int = 500  # steps per resumable checkpoint (and at the end of each stage)
    keep_checkpoints: int = 2  # resumable checkpoints kept per stage (the newest)
    val_every: int = 0  # steps per validation (right vs shuffled reference loss on held-out people); 0: off
    val_identities: int = 16  # val-split people in the validation set
    export_dtype: str = "float16"  # dtype of the exported checkpoint (the official files are fp16)

    def __post_init__(self):
        if self.world not in ("toy", "sdxl"):
            raise ValueError(f"world must be 'toy' or 'sdxl', got {self.world!r}")
        if self.world == "sdxl" and not self.data:
            raise ValueError("the sdxl world trains on a prepared folder: pass --data (python -m hyperlora.train prepare)")
        for name in ("batch_size", "grad_accum", "threads", "log_every", "checkpoint_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


@dataclass
class RunConfig:
    """Everything one stage of a run needs: the hypernetwork, the run, the stage."""

    model: HyperLoRAConfig = field(default_factory=HyperLoRAConfig)
    run: TrainConfig = field(default_factory=TrainConfig)
    stage: StageConfig = field(default_factory=StageConfig)

    def to_dict(self) -> dict:
        return json.loads(json.dumps({"model": self.model.to_dict(), "run": dataclasses.asdict(self.run),
                                      "stage": dataclasses.asdict(self.stage)}))  # fmt: skip

    @classmethod
    def from_dict(cls, values: dict) -> RunConfig:
        unknown = set(values) - {"model", "run", "stage"}
        if unknown:
            raise ValueError(f"unknown run-config sections {sorted(unknown)}; sections: model, run, stage")
        return cls(HyperLoRAConfig.from_dict(values.get("model", {})), strict_from_dict(TrainConfig, values.get("run", {})),
                   strict_from_dict(StageConfig, values.get("stage", {})))  # fmt: skip

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2) + "\n")


def list_train_presets() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("hyperlora.train.presets").iterdir() if p.name.endswith(".json"))


def preset_file(name: str):
    """A shipped preset's name (`toy`) or the path of the user's own preset file (`my/preset.json`)."""
    if name.endswith(".json"):
        if not Path(name).is_file():
            raise ValueError(f"preset file {name} not found")
        return Path(name)
    path = resources.files("hyperlora.train.presets") / f"{name}.json"
    if not path.is_file():
        raise ValueError(f"unknown training preset {name!r}; presets: {list_train_presets()} or a path to a .json file")
    return path


def load_preset(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """The preset's sections as written (only what differs from the defaults). `"extends": "toy"` starts from that
    preset (a shipped name or a file path): its model and run sections are updated key by key, and each of its
    stages' entries likewise."""
    path = preset_file(name)
    values = json.loads(path.read_text())
    values.pop("_comment", None)
    unknown = set(values) - {"model", "run", "stages", "schedule", "extends"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; sections: model, run, stages, schedule, extends")
    parent = values.pop("extends", None)
    if parent is None:
        return values
    if parent in (*_seen, name):
        raise ValueError(f"preset {name!r} extends itself through {[*_seen, name, parent]}")
    merged = load_preset(parent, (*_seen, name))
    for section in ("model", "run"):
        merged[section] = {**merged.get(section, {}), **values.get(section, {})}
    stages = merged.setdefault("stages", {})
    for key, entry in values.get("stages", {}).items():
        stages[key] = {**stages.get(key, {}), **entry}
    if "schedule" in values:
        merged["schedule"] = values["schedule"]
    return merged


def preset_schedule(name: str) -> list[str]:
    """The phases a preset runs when neither --stage nor --stages is given (its "schedule"; the paper's 1, 2, 3)."""
    return [str(p) for p in load_preset(name).get("schedule", STAGES)]


def phase_stage(phase: int | str) -> int:
    """The stage a schedule phase runs: 3 or "3" is stage 3, and "3-path" a labelled phase of it."""
    number, dash, label = str(phase).partition("-")
    if not number.isdigit() or int(number) not in STAGES or (dash and not label):
        raise ValueError(f"unknown stage or phase {phase!r}: a stage {STAGES} or a preset's phase 'N-label'")
    return int(number)


def resolve(preset: str, stage: int | str, *, model: dict | None = None, run: dict | None = None,
            stage_overrides: dict | None = None) -> RunConfig:  # fmt: skip
    """Preset + overrides -> the RunConfig of one stage or labelled phase ("3-path"; unknown keys raise)."""
    values = load_preset(preset)
    stages = values.get("stages", {})
    number = phase_stage(stage)
    if str(stage) != str(number) and str(stage) not in stages:
        phases = sorted(k for k in stages if "-" in k)
        raise ValueError(f"preset {preset!r} has no phase {stage!r}; its phases: {phases or 'none'}")
    phase = stages.get(str(stage), {}) if str(stage) != str(number) else {}
    stage_values = {**stages.get(str(number), {}), **phase, **(stage_overrides or {}), "stage": number}
    return RunConfig(
        HyperLoRAConfig.from_dict({**values.get("model", {}), **(model or {})}),
        strict_from_dict(TrainConfig, {**values.get("run", {}), **(run or {})}),
        strict_from_dict(StageConfig, stage_values),
    )
