"""Samplers from diffusers' schedulers, all on AnimateDiff's training noise schedule.

AnimateDiff's motion modules were trained with a `linear` beta schedule (0.00085 -> 0.012), not
SD's `scaled_linear`; the official inference uses DDIM on it with `steps_offset=1`,
`clip_sample=False` and eta 0. Every sampler here starts from that schedule.
"""

from __future__ import annotations

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..schedule import ANIMATEDIFF_SCHEDULE

SCHEDULERS = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, dict(algorithm_type="dpmsolver++", solver_order=2)),
    "dpmpp_2m_karras": (
        DPMSolverMultistepScheduler,
        dict(algorithm_type="dpmsolver++", solver_order=2, use_karras_sigmas=True),
    ),
    "lcm": (LCMScheduler, {}),
}


def make_scheduler(name: str = "ddim", **overrides) -> SchedulerMixin:
    """A fresh scheduler by name (see `SCHEDULERS`); `overrides` change the schedule."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    cls, extra = SCHEDULERS[name]
    config = {**ANIMATEDIFF_SCHEDULE, **extra, **overrides}
    if cls is not DDIMScheduler and cls is not LCMScheduler:
        config.pop("clip_sample")
    return cls(**config)
