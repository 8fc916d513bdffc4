"""Frames folded into the batch, and predictions of frame windows fused back into a clip.

Every image layer runs per frame: a video `b c f h w` becomes `(b f) c h w` (frame-major per
video, as the official UNet3D does), and per-video inputs (timestep, text) are repeated per
frame. Windows of frames (context windows, or "views" of the motion modules alone) are
blended back with a per-frame weighted average (:class:`WindowAccumulator`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """b c f h w -> (b f) c h w"""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b f) c h w -> b c f h w"""
    bf, c, h, w = x.shape
    return x.view(bf // num_frames, num_frames, c, h, w).transpose(1, 2)


def frame_index(indices: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """An index for frames `indices`: a slice when they are consecutive, else a long tensor
    sent to `device` without blocking (a blocking copy would wait for the device's queue)."""
    indices = [int(i) for i in indices]
    if indices == list(range(indices[0], indices[0] + len(indices))):
        return slice(indices[0], indices[0] + len(indices))
    return torch.tensor(indices).to(device, non_blocking=True)


def select_frames(x: torch.Tensor, indices: Sequence[int], dim: int = 2) -> torch.Tensor:
    """`x` restricted to frames `indices` along `dim` (a view for consecutive frames)."""
    index = frame_index(indices, x.device)
    if isinstance(index, slice):
        return x.narrow(dim, index.start, index.stop - index.start)
    return x.index_select(dim, index)


def per_frame(t: torch.Tensor | None, batch: int, num_frames: int) -> torch.Tensor | None:
    """Repeat a per-video tensor for each frame; pass per-frame tensors through."""
    if t is None or t.shape[0] == batch * num_frames:
        return t
    if t.shape[0] != batch:
        raise ValueError(f"expected {batch} or {batch * num_frames} rows, got {t.shape[0]}")
    return t.repeat_interleave(num_frames, dim=0)


def per_frame_inputs(
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    batch: int,
    num_frames: int,
    device: torch.device,
    shared_text: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep and text for frames folded into the batch (`shared_text`: text given per video
    stays so, for attention that shares it across frames)."""
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 1 and timestep.shape[0] == batch:
        timestep = timestep.repeat_interleave(num_frames)
    if shared_text and encoder_hidden_states.shape[0] == batch:
        return timestep, encoder_hidden_states
    return timestep, per_frame(encoder_hidden_states, batch, num_frames)


def window_text(
    text: torch.Tensor, indices: Sequence[int], batch: int, num_frames: int
) -> torch.Tensor:
    """The text embeddings for one window: shared text (batch, n, d) is returned as is;
    per-frame text (batch * num_frames, n, d) (frame-major per batch item) becomes
    (batch * len(indices), n, d) holding those frames."""
    if text.shape[0] == batch:
        return text
    if text.shape[0] != batch * num_frames:
        raise ValueError(
            f"text has {text.shape[0]} rows; expected {batch} (shared) or "
            f"{batch * num_frames} (batch {batch} x {num_frames} frames)"
        )
    per_frame_text = select_frames(text.view(batch, num_frames, *text.shape[1:]), indices, 1)
    return per_frame_text.reshape(batch * len(indices), *text.shape[1:])


class WindowAccumulator:
    """Weighted average of window predictions over the whole clip.

    `add(indices, value, weights)` adds `value` (b, c, len, h, w) times `weights` (len,) into
    the frames `indices` of a (b, c, f, h, w) buffer and `weights` into a per-frame sum;
    `result()` divides. Sums are kept in float32 (fp16 model outputs would lose precision).
    Which frames were covered is tracked on the host, so `result()` never waits for the device.
    A single window over all frames gives back its prediction up to rounding (exactly with
    flat weights); skip fusion for bit-identical output.
    """

    def __init__(
        self,
        shape: Sequence[int],
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if len(shape) != 5:
            raise ValueError(f"shape must be (b, c, f, h, w), got {tuple(shape)}")
        self.total = torch.zeros(tuple(shape), device=device, dtype=dtype)
        self.weight = torch.zeros(shape[2], device=device, dtype=dtype)
        self._covered: set[int] = set()

    @classmethod
    def like(cls, tensor: torch.Tensor, dtype: torch.dtype = torch.float32) -> WindowAccumulator:
        """An empty accumulator with the shape and device of `tensor` (b, c, f, h, w)."""
        return cls(tensor.shape, device=tensor.device, dtype=dtype)

    def add(
        self, indices: Sequence[int], value: torch.Tensor, weights: torch.Tensor | None = None
    ) -> None:
        """Add one window's prediction `value` (b, c, len(indices), h, w); weights must be > 0."""
        indices = [int(i) for i in indices]
        expected = (*self.total.shape[:2], len(indices), *self.total.shape[3:])
        if tuple(value.shape) != expected:
            raise ValueError(f"window value must have shape {expected}, got {tuple(value.shape)}")
        if weights is None:
            weights = torch.ones(len(indices))
        if weights.shape != (len(indices),):
            raise ValueError(
                f"weights must have shape ({len(indices)},), got {tuple(weights.shape)}"
            )
        weights = weights.to(self.total.device, self.total.dtype)
        weighted = value.to(self.total.dtype) * weights.view(1, 1, -1, 1, 1)
        index = frame_index(indices, self.total.device)
        if isinstance(index, slice):  # consecutive frames: add in place, no index tensor
            self.total[:, :, index] += weighted
            self.weight[index] += weights
        else:
            self.total.index_add_(2, index, weighted)
            self.weight.index_add_(0, index, weights)
        self._covered.update(indices)

    def result(self) -> torch.Tensor:
        """(b, c, f, h, w): per frame, the weighted average of the windows holding it."""
        missing = sorted(set(range(self.total.shape[2])) - self._covered)
        if missing:
            raise ValueError(f"frames {missing} were in no window")
        return self.total / self.weight.view(1, 1, -1, 1, 1)
