"""Reading, checking and converting every kind of weight file the project uses."""

from .io import CheckpointError, load_state_dict, read_metadata, save_state_dict
from .motion import MotionCheckpoint, load_motion_module, read_motion_checkpoint, save_motion_module

__all__ = [
    "CheckpointError",
    "MotionCheckpoint",
    "load_motion_module",
    "load_state_dict",
    "read_metadata",
    "read_motion_checkpoint",
    "save_motion_module",
    "save_state_dict",
]
