"""What every control adds to the UNet: residuals for its skip connections and mid block."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Residuals:
    """ControlNet outputs, frames folded into the batch: one tensor per down-block skip
    connection and one for the mid block. Several controls add up."""

    down: list[torch.Tensor]
    mid: torch.Tensor

    def __add__(self, other: Residuals | None) -> Residuals:
        if other is None:
            return self
        return Residuals([a + b for a, b in zip(self.down, other.down)], self.mid + other.mid)

    def unet_kwargs(self, dtype: torch.dtype) -> dict:
        """Keyword arguments of diffusers' `UNet2DConditionModel.forward`."""
        return {
            "down_block_additional_residuals": tuple(r.to(dtype) for r in self.down),
            "mid_block_additional_residual": self.mid.to(dtype),
        }


def active(step: int, num_steps: int, start: float, end: float) -> bool:
    """Whether a control applies at this step, `start`/`end` being fractions of the steps
    (diffusers' `control_guidance_start`/`_end` rule)."""
    return not (step / num_steps < start or (step + 1) / num_steps > end)
