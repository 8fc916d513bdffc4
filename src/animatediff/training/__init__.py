"""The three-stage AnimateDiff training recipe (domain adapter, motion module, MotionLoRA),
image fine-tuning and consistency distillation of a motion module, on Hugging Face Accelerate."""

from __future__ import annotations

from pathlib import Path

from .config import STAGES, Config, ConfigError, load_config, parse_config
from .trainer import Trainer, TrainingDiverged


def train(
    config: Config | dict | str | Path, resume: bool = False, overwrite: bool = False
) -> list[Path]:
    """Run a training config (a `Config`, a dict as in the YAML, or a YAML path); returns the
    files written (motion module, MotionLoRA, adapter or UNet). A non-empty output_dir needs
    `resume` (continue from its latest checkpoint) or `overwrite` (replace that run)."""
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = parse_config(config)
    return Trainer(config, resume=resume, overwrite=overwrite).fit()


__all__ = [
    "STAGES",
    "Config",
    "ConfigError",
    "Trainer",
    "TrainingDiverged",
    "load_config",
    "parse_config",
    "train",
]
