"""Scheduler choice. Every job gets its own scheduler instance: schedulers keep per-run state
(step index, multistep history), and the loaded model is shared by jobs."""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin


def make_scheduler(name: str, model_scheduler: SchedulerMixin) -> SchedulerMixin:
    """A fresh scheduler of the named kind, configured from the model's own scheduler config."""
    config = model_scheduler.config
    if name == "default":
        return type(model_scheduler).from_config(config)
    if name == "ddim":
        return DDIMScheduler.from_config(config)
    if name == "euler":
        return EulerDiscreteScheduler.from_config(config)
    if name == "dpm++2m":
        return DPMSolverMultistepScheduler.from_config(config, algorithm_type="dpmsolver++", solver_order=2)
    raise ValueError(f"unknown scheduler {name!r}")
