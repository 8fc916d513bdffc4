"""A run's output folder: refused when it already holds something (unless resuming or
overwriting), and replaced without losing the previous run to a start that fails.

`--overwrite` replaces only what a training run writes (`RUN_OUTPUTS` and the stage results);
other files in the folder are left alone. The previous run's outputs are first moved aside into
`.previous-run/` (renames within the folder: nothing is copied or lost), after everything that
can fail early (config, data, models) has succeeded. When the new run writes its first
checkpoint or its results, `.previous-run/` is deleted; if it fails before that, its own partial
outputs are removed and the previous run's are moved back. A run killed outright (SIGKILL)
leaves `.previous-run/` in place; the next --overwrite keeps it aside until it saves.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import ConfigError

# What the trainer itself writes (TensorBoard logs go to `train/`, Accelerate's run name).
LOG_NAMES = ("config.json", "metrics.jsonl", "loss.png", "validation", "checkpoints", "train")
# What a finished run writes beside its logs (the stages' results).
RESULT_NAMES = (
    "motion_module.safetensors",
    "motion_module_diffusers",
    "motion_lora.safetensors",
    "domain_adapter.safetensors",
    "distill_lora.safetensors",
    "unet",
)
RUN_OUTPUTS = LOG_NAMES + RESULT_NAMES
PREVIOUS = ".previous-run"


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _remove(path: Path) -> None:
    shutil.rmtree(path) if path.is_dir() else path.unlink()


def check_output_dir(folder: Path, resume: bool, overwrite: bool) -> None:
    """Refuse a non-empty folder unless the run resumes or overwrites (before anything loads)."""
    if resume and overwrite:
        raise ConfigError("--resume continues the run in output_dir, --overwrite replaces it")
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"output_dir {folder}: is a file, not a folder")
    if resume and not any((folder / "checkpoints").glob("step-*")):
        raise ConfigError(f"--resume: no checkpoint in {folder / 'checkpoints'} to continue from")
    entries = _entries(folder)
    if resume or overwrite or not entries:
        return
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    kept = (
        f"; {PREVIOUS}/ holds the run a killed --overwrite replaced" if PREVIOUS in entries else ""
    )
    raise ConfigError(
        f"output_dir {folder} is not empty ({shown}): pass --resume to continue the run there, "
        f"--overwrite to replace it, or choose another output_dir{kept}"
    )


class OutputSwap:
    """Moves a previous run's outputs aside and back (module docstring); main process only."""

    def __init__(self, folder: Path, created: bool):
        self.folder = folder
        self.aside = folder / PREVIOUS
        self.created = created  # the run made the folder: a roll-back removes it again
        self.pending = False

    def replace_previous(self) -> list[str]:
        """Move the previous run's outputs into `.previous-run/`; returns their names. If a
        `.previous-run/` is already there, a run that replaced it was killed before saving
        anything: its partial outputs go, and the run before it stays set aside."""
        names = [n for n in _entries(self.folder) if n in RUN_OUTPUTS]
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.aside.is_dir():
            for name in names:
                _remove(self.folder / name)
        elif names:
            self.aside.mkdir()
            for name in names:
                os.replace(self.folder / name, self.aside / name)
        self.pending = True
        return names

    def commit(self) -> None:
        """The new run has saved something of its own: the previous one goes."""
        if self.pending:
            shutil.rmtree(self.aside, ignore_errors=True)
            self.pending = False

    def roll_back(self) -> None:
        """The new run failed before saving anything: put the previous run back."""
        if not self.pending:
            return
        for name in _entries(self.folder):
            if name in RUN_OUTPUTS:
                _remove(self.folder / name)
        for name in _entries(self.aside):
            os.replace(self.aside / name, self.folder / name)
        shutil.rmtree(self.aside, ignore_errors=True)
        if self.created and not _entries(self.folder):
            self.folder.rmdir()
        self.pending = False
