"""Initial-noise tools for longer and more consistent videos: FreeNoise and FreeInit.

FreeNoise (Qiu et al. 2023, "FreeNoise: Tuning-Free Longer Video Diffusion via Noise
Rescheduling") draws noise for the first context window only and builds the later windows from
shuffled copies of it, so every window starts from the same set of noise frames and the
content stays coherent over a long clip.

FreeInit (Wu et al. 2023, "FreeInit: Bridging Initialization Gap in Video Diffusion Models")
samples several times: after each pass the result is diffused back to z_T, and the next pass
starts from the low spatio-temporal frequencies of that z_T plus the high frequencies of fresh
Gaussian noise (:func:`freeinit_reinit` with a :func:`freq_filter`).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import MappingProxyType

import torch

__all__ = [
    "FILTERS",
    "FREEINIT_DEFAULTS",
    "freeinit_reinit",
    "freenoise_latents",
    "freq_filter",
    "mix_shared_noise",
]

FILTERS = ("butterworth", "gaussian", "ideal", "box")

# The paper's defaults. `iterations` is the number of sampling passes (for the caller's loop);
# the other keys are freq_filter's keywords.
FREEINIT_DEFAULTS = MappingProxyType(
    {"iterations": 3, "kind": "butterworth", "n": 4, "d_s": 0.25, "d_t": 0.25}
)

_FREQ_DIMS = (-3, -2, -1)


def freenoise_latents(
    latents: torch.Tensor,
    context_length: int = 16,
    context_overlap: int = 4,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """FreeNoise rescheduling of initial noise (b, c, f, h, w); returns a new tensor.

    With L = context_length, hop = L - context_overlap: frames [0, L) keep their noise. Then,
    for start = L, L + hop, L + 2*hop, ... the frames [start, start + hop) (fewer at the end)
    get the noise of frames [start - L, start - L + hop) in an order drawn by
    `torch.randperm(hop, generator=generator)` (the first `count` entries when fewer frames are
    left), one permutation per chunk, shared by batch and channels. Those source frames are the
    frames window k-1 (frames [(k-1)*hop, (k-1)*hop + L)) does not share with window k, so
    window k holds a reordering of window k-1's noise. Chunks are filled in order, each from
    the already rescheduled frames. f <= L: returned unchanged (the same tensor). The draws
    advance `generator` (on its device; the CPU default generator when None).
    """
    if latents.ndim != 5:
        raise ValueError(f"latents must be (b, c, f, h, w), got shape {tuple(latents.shape)}")
    if context_length < 1 or not 0 <= context_overlap < context_length:
        raise ValueError(
            f"need context_length >= 1 and 0 <= context_overlap < context_length, got "
            f"{context_length} and {context_overlap}"
        )
    num_frames = latents.shape[2]
    if num_frames <= context_length:
        return latents
    hop = context_length - context_overlap
    device = generator.device if generator is not None else torch.device("cpu")
    out = latents.clone()
    for start in range(context_length, num_frames, hop):
        count = min(hop, num_frames - start)
        order = torch.randperm(hop, generator=generator, device=device)[:count]
        source = order.to(latents.device) + (start - context_length)
        out[:, :, start : start + count] = out[:, :, source]
    return out


def _centred(size: int) -> torch.Tensor:
    """Normalised frequency coordinate of each fftshifted bin: 2 (i - size//2) / size. For
    even sizes this is the paper's 2i/size - 1; for odd ones it is still 0 at the zero-frequency
    bin, which fftshift puts at index size//2."""
    return 2 * (torch.arange(size, dtype=torch.float64) - size // 2) / size


def freq_filter(
    shape: Sequence[int],
    kind: str = "butterworth",
    n: int = 4,
    d_s: float = 0.25,
    d_t: float = 0.25,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """FreeInit's 3D low-pass filter (f, h, w) over the centred (fftshifted) frequency domain.

    `shape` ends in (T, H, W) (e.g. the latents' shape). With the normalised coordinates
    ft = 2t/T - 1, fh = 2h/H - 1, fw = 2w/W - 1 (see `_centred` for odd sizes) and
    d^2 = (d_s/d_t * ft)^2 + fh^2 + fw^2, as published:

    - `gaussian`: exp(-d^2 / (2 d_s^2))
    - `butterworth`: 1 / (1 + (d^2 / d_s^2)^n)
    - `ideal`: 1 where d^2 <= d_s^2, else 0 (a sphere of radius d_s)
    - `box`: 1 where |ft| <= d_t, |fh| <= d_s and |fw| <= d_s, else 0

    1 at the zero frequency; d_s or d_t = 0 gives all zeros (keep no low frequencies).
    """
    if kind not in FILTERS:
        raise ValueError(f"unknown filter {kind!r}; one of {FILTERS}")
    if len(shape) < 3:
        raise ValueError(f"shape must end in (frames, height, width), got {tuple(shape)}")
    if d_s < 0 or d_t < 0 or n < 1:
        raise ValueError(f"need d_s, d_t >= 0 and n >= 1, got d_s={d_s}, d_t={d_t}, n={n}")
    frames, height, width = (int(s) for s in shape[-3:])
    if d_s == 0 or d_t == 0:
        return torch.zeros(frames, height, width, device=device, dtype=dtype)
    ft = _centred(frames).view(-1, 1, 1)
    fh = _centred(height).view(1, -1, 1)
    fw = _centred(width).view(1, 1, -1)
    d2 = (d_s / d_t * ft) ** 2 + fh**2 + fw**2
    if kind == "gaussian":
        mask = torch.exp(-d2 / (2 * d_s**2))
    elif kind == "butterworth":
        mask = 1 / (1 + (d2 / d_s**2) ** n)
    elif kind == "ideal":
        mask = (d2 <= d_s**2).double()
    else:
        mask = ((ft.abs() <= d_t) & (fh.abs() <= d_s) & (fw.abs() <= d_s)).double()
    return mask.to(device=device, dtype=dtype)


def freeinit_reinit(
    denoised_latents_noised: torch.Tensor, fresh_noise: torch.Tensor, lpf: torch.Tensor
) -> torch.Tensor:
    """FreeInit's noise reinitialisation: low frequencies of `denoised_latents_noised` (the
    previous pass's result diffused back to z_T) + high frequencies of `fresh_noise`.

    Both (..., f, h, w) of the same shape; `lpf` (f, h, w) (or broadcastable) from
    :func:`freq_filter`. In the fftshifted 3D spectrum over the last three dims:
    Z * lpf + N * (1 - lpf), transformed back (real part), in float32, returned in the dtype
    of `denoised_latents_noised`.
    """
    if denoised_latents_noised.shape != fresh_noise.shape:
        raise ValueError(
            f"shapes differ: {tuple(denoised_latents_noised.shape)} and {tuple(fresh_noise.shape)}"
        )
    lpf = lpf.to(denoised_latents_noised.device, torch.float32)
    low = _spectrum(denoised_latents_noised) * lpf
    high = _spectrum(fresh_noise.to(denoised_latents_noised.device)) * (1 - lpf)
    mixed = torch.fft.ifftshift(low + high, dim=_FREQ_DIMS)
    out = torch.fft.ifftn(mixed, dim=_FREQ_DIMS).real
    return out.to(denoised_latents_noised.dtype)


def _spectrum(x: torch.Tensor) -> torch.Tensor:
    # float32: FFTs of half tensors are unsupported on CPU and imprecise elsewhere
    return torch.fft.fftshift(torch.fft.fftn(x.float(), dim=_FREQ_DIMS), dim=_FREQ_DIMS)


def mix_shared_noise(
    noise: torch.Tensor, shared: float, generator: torch.Generator | None = None
) -> torch.Tensor:
    """A mixed noise prior (PYoCo, Ge et al. 2023): `sqrt(shared)` of a noise frame common to
    all frames of each clip plus `sqrt(1 - shared)` of each frame's own noise, so every frame
    stays unit Gaussian while frames are correlated by `shared`. The common frame is drawn after
    `noise` from the same generator; `shared=0` returns `noise` itself (no draw)."""
    if not shared:
        return noise
    b, c, _, h, w = noise.shape
    device = generator.device if generator is not None else noise.device
    common = torch.randn((b, c, 1, h, w), generator=generator, device=device).to(noise)
    return shared**0.5 * common + (1 - shared) ** 0.5 * noise
