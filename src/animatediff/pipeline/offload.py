"""Model offloading: weights wait in RAM and each model goes to the device only for its phase.

`model` (diffusers' `enable_model_cpu_offload`): one group of models on the device at a time:
the text encoder (and IP-Adapter) while prompts are encoded, the VAE while it encodes or decodes,
the UNet with its motion modules and controls while denoising. `sequential` (diffusers'
`enable_sequential_cpu_offload`): as `model`, but the UNet's weights are streamed to the device
layer by layer (accelerate's `cpu_offload`): the least memory, and slow.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from accelerate import cpu_offload
from torch import nn

from ..options import OFFLOAD_MODES

MODES = OFFLOAD_MODES
CPU = torch.device("cpu")


class Offload:
    """Where each group of models is, phase by phase (`activate(group)` before a phase)."""

    def __init__(self, mode: str, device: torch.device | str, groups: dict[str, list]):
        if mode not in MODES:
            raise ValueError(f"offload must be one of {', '.join(MODES)}, not {mode!r}")
        self.mode, self.device = mode, torch.device(device)
        self.groups = {
            name: [m for m in modules if m is not None] for name, modules in groups.items()
        }
        self.current: str | None = None
        if mode == "none":
            return
        streamed = self.groups["unet"] if mode == "sequential" else []
        for module in _unique(m for ms in self.groups.values() for m in ms):
            module.to(CPU)
        for module in streamed:  # its weights stay in RAM; hooks bring each layer in
            cpu_offload(module, self.device)
        self._streamed = {id(m) for m in streamed}

    def activate(self, group: str) -> None:
        """Move `group`'s models to the device and every other model to RAM (no-op without
        offloading, or when `group` is already there)."""
        if self.mode == "none" or group == self.current:
            return
        wanted = {id(m) for m in self.groups[group]}
        for modules in self.groups.values():
            for module in modules:
                if id(module) not in wanted and id(module) not in self._streamed:
                    module.to(CPU)
        for module in self.groups[group]:
            if id(module) not in self._streamed:
                module.to(self.device)
        self.current = group

    def place(self) -> dict[str, str]:
        """The device of each group's first weight (for tests and reports)."""
        return {
            name: str(next(modules[0].parameters()).device) if modules else "-"
            for name, modules in self.groups.items()
        }


def _unique(modules: Iterable[nn.Module]) -> list[nn.Module]:
    seen, out = set(), []
    for m in modules:
        if id(m) not in seen:
            seen.add(id(m))
            out.append(m)
    return out
