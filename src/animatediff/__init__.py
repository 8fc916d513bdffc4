"""AnimateDiff: animate personalised Stable Diffusion 1.5 models with motion modules.

Names are imported on first use, so that `animatediff --help` or a usage error does not pay
for importing diffusers and transformers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "AnimationPipeline": "animatediff.pipeline",
    "CheckpointError": "animatediff.checkpoints.io",
    "MotionModuleConfig": "animatediff.motion.config",
    "MotionModules": "animatediff.motion.module",
    "MotionUNet": "animatediff.motion.unet",
    "Video": "animatediff.video",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'animatediff' has no attribute {name!r}")
