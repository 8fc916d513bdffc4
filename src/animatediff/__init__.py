"""AnimateDiff: animate personalised Stable Diffusion 1.5 models with motion modules."""

from .checkpoints import CheckpointError
from .motion import MotionModuleConfig, MotionModules, MotionUNet
from .pipeline import AnimationPipeline
from .video import Video

__version__ = "0.1.0"
__all__ = [
    "AnimationPipeline",
    "CheckpointError",
    "MotionModuleConfig",
    "MotionModules",
    "MotionUNet",
    "Video",
]
