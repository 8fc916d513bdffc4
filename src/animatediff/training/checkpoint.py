"""Checkpoints with Accelerate's `save_state` / `load_state`, in safe formats only.

Accelerate writes and restores the optimizer (`optimizer.bin`), the LR schedule
(`scheduler.bin`), the fp16 grad scaler (`scaler.pt`) and every process's RNG states: Python,
NumPy, torch CPU and CUDA (`random_states_<process>.pkl`). `load_state` reads all of them with
`torch.load(weights_only=True)`: tensors and plain containers, never code.

What else a run needs is written by a save hook registered with Accelerate, not as registered
objects: Accelerate 1.x unpickles those with `weights_only=False`. The hook writes the trainable
weights, the distillation target and the EMA as safetensors and the run's progress (step,
counters, EMA settings) as JSON, and keeps Accelerate from also writing the full model (the
frozen image model would multiply the size of every checkpoint).

A checkpoint is written into `.tmp-step-N` and renamed to `step-N` when complete; the last `keep`
are kept.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import load as accelerate_load

from ..checkpoints.io import load_state_dict, save_state_dict
from ..errors import CheckpointError

PROGRESS_FILE = "progress.json"
PREFIX = "step-"


@dataclass
class RunState:
    """What the hooks save beyond Accelerate's own state: named groups of tensors (one
    safetensors file each, `tensors()[name]` -> `name.safetensors`) and JSON-able progress."""

    tensors: Callable[[], dict[str, dict[str, torch.Tensor]]]
    progress: Callable[[], dict]
    restore: Callable[[dict[str, dict[str, torch.Tensor]], dict], None]


class Checkpoints:
    """`save(step)` and `resume()` for one run's `root` folder of checkpoints."""

    def __init__(self, accelerator: Accelerator, root: Path, keep: int, state: RunState):
        self.accelerator, self.root, self.keep, self.state = accelerator, root, keep, state
        accelerator.register_save_state_pre_hook(self._save_hook)
        accelerator.register_load_state_pre_hook(self._load_hook)

    def latest(self) -> Path | None:
        found = sorted(self.root.glob(f"{PREFIX}*"))
        return found[-1] if found else None

    def save(self, step: int) -> Path:
        """Write the checkpoint of `step` (every process takes part); returns its folder."""
        acc = self.accelerator
        final = self.root / f"{PREFIX}{step:08d}"
        tmp = self.root / f".tmp-{PREFIX}{step:08d}"
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))  # each process adds its RNG states
        acc.wait_for_everyone()
        if acc.is_main_process:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in sorted(self.root.glob(f"{PREFIX}*"))[: -self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()
        return final

    def resume(self) -> Path:
        """Restore the latest checkpoint into the run; returns its folder."""
        ckpt = self.latest()
        if ckpt is None:
            raise CheckpointError(self.root, "--resume: no checkpoint here to continue from")
        _check_pickles(ckpt)
        self.accelerator.load_state(str(ckpt))
        return ckpt

    # -- Accelerate's hooks ----------------------------------------------------------------------
    def _save_hook(self, models: list, weights: list, output_dir: str) -> None:
        if self.accelerator.is_main_process:
            folder = Path(output_dir)
            groups = self.state.tensors()
            for name, tensors in groups.items():
                plain = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
                save_state_dict(plain, folder / f"{name}.safetensors")
            progress = {**self.state.progress(), "tensor_files": sorted(groups)}
            text = json.dumps(progress, indent=2, sort_keys=True)
            (folder / PROGRESS_FILE).write_text(text + "\n")
        weights.clear()  # the trainable tensors are saved above: not the whole model again

    def _load_hook(self, models: list, input_dir: str) -> None:
        folder = Path(input_dir)
        progress_file = folder / PROGRESS_FILE
        if not progress_file.is_file():
            raise CheckpointError(folder, f"not a checkpoint of this version (no {PROGRESS_FILE})")
        try:
            progress = json.loads(progress_file.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(progress_file, f"unreadable ({e})") from None
        tensors = {
            name: load_state_dict(folder / f"{name}.safetensors")
            for name in progress.get("tensor_files", [])
        }
        self.state.restore(tensors, progress)
        models.clear()  # restored above; Accelerate has no model file to read


def _check_pickles(folder: Path) -> None:
    """Every pickled file of Accelerate's in `folder` loads as data only (tensors, plain
    containers, NumPy's RNG arrays), before `load_state` reads it: Accelerate would skip RNG
    states it cannot read, and the resumed run would quietly differ."""
    for path in sorted(folder.iterdir()):
        if path.suffix not in (".bin", ".pkl", ".pt"):
            continue
        try:
            accelerate_load(path, map_location="cpu", weights_only=True)  # as load_state does
        except Exception as e:  # noqa: BLE001 - any failure: the file is not what we wrote
            why = "needs code to load" if isinstance(e, pickle.UnpicklingError) else "unreadable"
            raise CheckpointError(path, f"{why}; not a checkpoint this trainer wrote") from None
