"""The motion module (temporal transformer), its insertion into a 2D UNet, and its configs."""

from .config import MotionModuleConfig
from .module import MotionModules, TemporalModule


def __getattr__(name: str):
    if name == "MotionUNet":  # imports diffusers: only when asked for
        from .unet import MotionUNet

        return MotionUNet
    raise AttributeError(f"module 'animatediff.motion' has no attribute {name!r}")


__all__ = ["MotionModuleConfig", "MotionModules", "MotionUNet", "TemporalModule"]
