"""Control: SparseCtrl keyframe encoders and standard ControlNets, as residuals for the UNet."""

from .controlnet import ControlNetInput, controlnet_inputs, load_controlnet
from .residuals import Residuals, active
from .sparsectrl import (
    SparseControlNet,
    SparseCtrlInput,
    load_sparsectrl,
    sparse_condition,
    sparsectrl_input,
)

__all__ = [
    "ControlNetInput",
    "Residuals",
    "SparseControlNet",
    "SparseCtrlInput",
    "active",
    "controlnet_inputs",
    "load_controlnet",
    "load_sparsectrl",
    "sparse_condition",
    "sparsectrl_input",
    "total_residuals",
]


def total_residuals(controls, sample, t, text, frames, step, num_steps, windows=None):
    """The sum of every active control's residuals, or None when none applies."""
    total = None
    for control in controls:
        res = control.residuals(sample, t, text, frames, step, num_steps, windows)
        total = res if total is None else total + res
    return total
