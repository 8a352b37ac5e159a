"""Samplers by the names ComfyUI users know, built on a pipeline's own noise schedule.

The official workflows sample with `dpmpp_2m` + `karras` (facts §3.2): diffusers'
DPMSolverMultistepScheduler with dpmsolver++, order 2 and Karras sigmas. Every scheduler is made with
`from_config(pipe.scheduler.config, ...)`, so the model's betas and prediction type are kept.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)

DEFAULT_SCHEDULER = "dpmpp_2m_karras"  # the official workflows' sampler
DPMPP_2M = {"algorithm_type": "dpmsolver++", "solver_order": 2}
KEEP = "pipeline"  # the name that keeps the scheduler the pipeline was loaded with
SCHEDULERS = {  # name -> (class, overrides of the pipeline's scheduler config)
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {**DPMPP_2M, "use_karras_sigmas": True}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {**DPMPP_2M, "use_karras_sigmas": False}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
}


def scheduler_names() -> list[str]:
    return [*SCHEDULERS, KEEP]


def set_scheduler(pipe, name: str) -> str:
    """Replace `pipe.scheduler` by the sampler `name` on the same noise schedule; returns what it now is."""
    if name != KEEP:
        if name not in SCHEDULERS:
            raise ValueError(f"unknown scheduler {name!r}; known: {', '.join(scheduler_names())}")
        cls, overrides = SCHEDULERS[name]
        pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)
    return describe_scheduler(pipe.scheduler)


def describe_scheduler(scheduler) -> str:
    """e.g. 'DPMSolverMultistepScheduler(algorithm_type=dpmsolver++, solver_order=2, use_karras_sigmas=True, ...)'."""
    keys = ("algorithm_type", "solver_order", "use_karras_sigmas", "prediction_type", "timestep_spacing")
    values = ", ".join(f"{k}={scheduler.config[k]}" for k in keys if k in scheduler.config)
    return f"{type(scheduler).__name__}({values})"
