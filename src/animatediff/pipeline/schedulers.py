"""Samplers from diffusers' schedulers, all on AnimateDiff's training noise schedule.

AnimateDiff's motion modules were trained with a `linear` beta schedule (0.00085 -> 0.012), not
SD's `scaled_linear`; the official inference uses DDIM on it with `steps_offset=1`,
`clip_sample=False` and eta 0. Every sampler here starts from that schedule; keyword overrides
change it (e.g. `timestep_spacing="trailing"` for AnimateDiff-Lightning, see `presets.py`).
"""

from __future__ import annotations

import inspect

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from ..options import OptionError
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


def scheduler_options(name: str) -> tuple[str, ...]:
    """The configuration keys the scheduler `name` accepts as overrides."""
    cls, _ = _lookup(name)
    return tuple(p for p in inspect.signature(cls.__init__).parameters if p != "self")


def make_scheduler(name: str = "ddim", **overrides) -> SchedulerMixin:
    """A fresh scheduler by name (see `SCHEDULERS`) on AnimateDiff's schedule; `overrides`
    (any of `scheduler_options(name)`) change it. Keys of the base schedule that a scheduler
    does not have (DDIM's `clip_sample` for Euler) are dropped; unknown overrides are refused."""
    cls, extra = _lookup(name)
    options = scheduler_options(name)
    unknown = sorted(set(overrides) - set(options))
    if unknown:
        raise OptionError(f"scheduler {name!r} has no option {', '.join(map(repr, unknown))}")
    base = {k: v for k, v in {**ANIMATEDIFF_SCHEDULE, **extra}.items() if k in options}
    return cls(**{**base, **overrides})


def _lookup(name: str):
    if name not in SCHEDULERS:
        raise OptionError(f"unknown scheduler {name!r}; choose one of: {', '.join(SCHEDULERS)}")
    return SCHEDULERS[name]
