"""The three-stage AnimateDiff training recipe (domain adapter, motion module, MotionLoRA),
image fine-tuning and consistency distillation of a motion module, on Hugging Face Accelerate.

The config names are torch-free and imported at once (the command line checks a config before
anything heavy loads); the trainer's are imported on first use.
"""

from __future__ import annotations

import importlib

from .config import STAGES, Config, ConfigError, load_config, parse_config

_TRAINER = ("Trainer", "TrainingDiverged", "train")

__all__ = ["STAGES", "Config", "ConfigError", *_TRAINER, "load_config", "parse_config"]


def __getattr__(name: str):
    if name in _TRAINER:
        return getattr(importlib.import_module("animatediff.training.trainer"), name)
    raise AttributeError(f"module 'animatediff.training' has no attribute {name!r}")
