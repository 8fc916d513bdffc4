"""Context windows: denoise clips longer than the motion module's training length.

At every denoising step the clip is cut into windows of at most `context_length` frames; the
model runs on each window and the per-window predictions are blended back, frame by frame, with
a weighted average (`motion.frames.WindowAccumulator`, weights from :func:`fuse_weights`). The
options carry the names ComfyUI-AnimateDiff-Evolved users know. The rules are written out in
:func:`context_windows`; everything here is pure and deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from ..options import FUSE_KINDS, ContextOptions

__all__ = ["context_windows", "fuse_weights"]


def _check_int(name: str, value: object, minimum: int) -> None:
    # bool is an int subclass; `True` as a length is certainly a mistake
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _van_der_corput(n: int) -> float:
    """Bit-reversed fraction of n: 0, 1/2, 1/4, 3/4, 1/8, 5/8, ... Consecutive steps land far
    apart and any run of steps spreads evenly over [0, 1), so seams never settle."""
    value, scale = 0.0, 0.5
    while n:
        value += (n & 1) * scale
        n >>= 1
        scale /= 2
    return value


def _dilations(num_frames: int, length: int, stride: int) -> list[int]:
    """2**k for k < stride, keeping only spacings whose window (span (length-1)*d + 1) fits in
    the clip: longer ones would repeat frames (looped) or fall off the end (the others)."""
    return [2**k for k in range(stride) if (length - 1) * 2**k + 1 <= num_frames]


def _straight(
    num_frames: int, length: int, hop: int, dilation: int, offset: int
) -> list[list[int]]:
    """Non-wrapping windows: starts -offset, -offset + hop*d, ... clamped at 0, below the last
    start N - span, then the last window pulled back to end exactly on the last frame."""
    span = (length - 1) * dilation + 1
    last = num_frames - span
    starts = [max(s, 0) for s in range(-offset, last, hop * dilation)] + [last]
    return [list(range(s, s + span, dilation)) for s in starts]


def _looped(num_frames: int, length: int, hop: int, dilation: int, phase: float) -> list[list[int]]:
    """Wrapping windows: ceil(N / (hop*d)) starts from floor(phase * N), indices modulo N."""
    step = hop * dilation
    first = int(phase * num_frames)
    count = math.ceil(num_frames / step)
    return [
        [(s + j * dilation) % num_frames for j in range(length)]
        for s in range(first, first + count * step, step)
    ]


def _unique(windows: Iterable[list[int]]) -> list[list[int]]:
    # clamping can make two windows identical; running the model twice on it is wasted work
    seen: set[tuple[int, ...]] = set()
    out = []
    for window in windows:
        if tuple(window) not in seen:
            seen.add(tuple(window))
            out.append(window)
    return out


def context_windows(
    num_frames: int, step: int = 0, num_steps: int = 1, options: ContextOptions | None = None
) -> list[list[int]]:
    """The frame-index windows to evaluate at denoising step `step` (0 <= step < num_steps).

    N = num_frames, L = context_length, O = context_overlap, hop = L - O.

    - N <= L: one window, `[0, ..., N-1]`, for every schedule (same result as no windows).
    - `static`: every step the same windows: starts 0, hop, 2*hop, ... while < N - L, then a
      last window starting at N - L (pulled back to end on frame N-1). All windows have L
      frames, nothing wraps. E.g. N=40, L=16, O=4: starts 0, 12, 24.
    - `uniform`: like `static` but shifted per step: with phase = van der Corput(step)
      (0, 1/2, 1/4, 3/4, 1/8, ...) and offset = floor(phase * hop), the starts are -offset,
      -offset + hop, ... (while < N - L), the first clamped to 0, then N - L. Step 0 equals
      `static`; later steps move the seams so no frame stays at a seam (frames L-1 and N-L
      stay window edges, of the clamped first and last windows, but lie inside others).
    - `looped`: the clip is a loop: offset = floor(phase * N) (phase as in `uniform`), starts
      offset + i*hop for i < ceil(N / hop), window indices (start + j) % N for j < L, so the
      last window runs over the end into the first frames.
    - `batched`: no overlap (context_overlap and context_stride ignored): chunks of L from 0,
      the last one pulled back to start at N - L so it too has L frames (it then overlaps the
      one before; fusion averages those frames). E.g. N=40, L=16: starts 0, 16, 24.

    context_stride s (all schedules but `batched`): dilation levels d = 1, 2, 4, ..., 2**(s-1),
    keeping only those with (L-1)*d + 1 <= N. Level d has windows of L frames spaced d apart,
    `[start, start + d, ..., start + (L-1)*d]`, placed by the same rule as the d = 1 windows with
    hop*d in place of hop and span (L-1)*d + 1 in place of L (so consecutive dilated windows
    share O frames); `uniform` uses offset floor(phase * hop * d). Windows are listed level by
    level, by start; duplicates are dropped. The d = 1 windows alone cover every frame at
    every step, each window holds L distinct frames in [0, N).
    """
    options = options or ContextOptions()
    _check_int("num_frames", num_frames, 1)
    _check_int("num_steps", num_steps, 1)
    _check_int("step", step, 0)
    if step >= num_steps:
        raise ValueError(f"step must be < num_steps ({num_steps}), got {step}")
    length, schedule = options.context_length, options.context_schedule
    if length is None or num_frames <= length:
        return [list(range(num_frames))]
    if schedule == "batched":
        return _unique(_straight(num_frames, length, length, 1, 0))
    phase = 0.0 if schedule == "static" else _van_der_corput(step)
    windows: list[list[int]] = []
    for d in _dilations(num_frames, length, options.context_stride):
        if schedule == "looped":
            windows += _looped(num_frames, length, options.hop, d, phase)
        else:
            windows += _straight(num_frames, length, options.hop, d, int(phase * options.hop * d))
    return _unique(windows)


def fuse_weights(
    window_len: int,
    kind: str = "pyramid",
    overlap: int = 0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Per-frame blending weights (window_len,) inside one window, all > 0.

    `flat`: all 1. `pyramid`: min(i+1, L-i), e.g. L=5 -> 1, 2, 3, 2, 1 (frames near a window's
    edge, where it lacks context, count less). `overlap-linear`: min(1, (i+1)/(O+1),
    (L-i)/(O+1)) with O = `overlap`: 1 in the middle, linear ramps over the O edge frames,
    e.g. L=8, O=3 -> .25, .5, .75, 1, 1, .75, .5, .25; where two windows overlap by O frames
    their ramps sum to 1 (a cross-fade). O = 0 gives all ones.
    """
    _check_int("window_len", window_len, 1)
    _check_int("overlap", overlap, 0)
    if kind not in FUSE_KINDS:
        raise ValueError(f"unknown fuse kind {kind!r}; one of {FUSE_KINDS}")
    # built in float64 on the CPU (exact ramps; mps has no float64), then moved
    i = torch.arange(window_len, dtype=torch.float64)
    if kind == "flat":
        weights = torch.ones_like(i)
    else:
        weights = torch.minimum(i + 1, window_len - i)
        if kind == "overlap-linear":
            weights = (weights / (overlap + 1)).clamp(max=1.0)
    return weights.to(device=device, dtype=dtype)
