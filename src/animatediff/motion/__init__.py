"""The motion module (temporal transformer), its insertion into a 2D UNet, and its configs."""

from .config import MotionModuleConfig
from .module import MotionModules, TemporalModule
from .unet import MotionUNet

__all__ = ["MotionModuleConfig", "MotionModules", "MotionUNet", "TemporalModule"]
