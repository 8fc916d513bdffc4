"""Between pixels and latents, frame by frame in chunks sized to a memory budget.

The VAE runs in the model's dtype. bf16 has fp32's range; SD1.5's VAE can overflow in fp16, so a
chunk whose fp16 result is not finite is computed again with the VAE upcast to fp32 (the weights
are cast back afterwards, exactly). Frames larger than `TILE_ABOVE` pixels are decoded in
overlapping tiles (diffusers' tiled decoding), so a frame's activations never exceed a tile's.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from diffusers import AutoencoderKL

from .options import TILING

TILE_ABOVE = 768  # pixels per side; larger frames are decoded in tiles by default ("auto")
BUDGET = 512 * 2**20  # bytes of activations one VAE call may take (estimated), when chunking
# Live activations at the VAE's peak, in units of (channels entering the last up block) x
# pixels x element size: measured with benchmarks/memory.py on SD1.5's VAE (see its README).
PEAK_FACTOR = 3


@torch.no_grad()
def encode_frames(
    vae: AutoencoderKL,
    frames: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int = 16,
) -> torch.Tensor:
    """(b, 3, f, H, W) in [0, 1] -> (b, 4, f, h, w) scaled latents: the posterior mean (the
    deterministic choice), or a sample from it. At most `chunk_size` frames per call, fewer when
    the memory budget says so; the result is on the VAE's device."""
    b, _, f, height, width = frames.shape
    pixels = (frames * 2 - 1).transpose(1, 2).reshape(b * f, 3, height, width)
    per_call = min(chunk_size, frames_per_call(vae, height, width))
    latents = []
    for chunk in pixels.split(per_call):
        posterior = _finite_or_upcast(vae, _encode, chunk)
        latents.append((posterior.sample(generator) if sample else posterior.mean).float())
    flat = torch.cat(latents) * vae.config.scaling_factor
    return flat.view(b, f, *flat.shape[1:]).transpose(1, 2)


@torch.no_grad()
def decode_latents(
    vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int = 16, tiling: str = "auto"
) -> torch.Tensor:
    """(b, 4, f, h, w) latents -> (b, 3, f, H, W) float32 frames in [0, 1], on the CPU.

    At most `chunk_size` frames per VAE call (fewer when the memory budget says so: the same
    result). `tiling`: "auto" (above `TILE_ABOVE` pixels), "on" or "off"."""
    b, c, f, h, w = latents.shape
    flat = (latents / vae.config.scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)
    tiled = uses_tiles(vae, h, w, tiling)
    size = (vae.tile_sample_min_size,) * 2 if tiled else _pixels(vae, h, w)
    per_call = min(chunk_size, frames_per_call(vae, *size))
    pixels = [decode_chunk(vae, chunk, tiled).float().cpu() for chunk in flat.split(per_call)]
    video = torch.cat(pixels)
    video = video.view(b, f, *video.shape[1:]).transpose(1, 2)
    return (video / 2 + 0.5).clamp(0, 1)


@torch.no_grad()
def decode_chunk(vae: AutoencoderKL, z: torch.Tensor, tiled: bool = False) -> torch.Tensor:
    """Unscaled latents (n, 4, h, w) -> pixels (n, 3, H, W) in [-1, 1] on the VAE's device,
    moved and cast there first; fp16 overflow recomputed in fp32."""
    return _finite_or_upcast(vae, _decode, z, tiled)


def uses_tiles(vae: AutoencoderKL, h: int, w: int, tiling: str = "auto") -> bool:
    """Whether latents of (h, w) are decoded in tiles under the `tiling` setting."""
    if tiling not in TILING:
        raise ValueError(f"tiling must be auto, on or off, not {tiling!r}")
    if tiling == "auto":
        return max(_pixels(vae, h, w)) > TILE_ABOVE
    return tiling == "on"


def frames_per_call(vae: AutoencoderKL, height: int, width: int, budget: int = BUDGET) -> int:
    """How many frames of `height` x `width` pixels one VAE call may take within `budget`."""
    channels = list(reversed(vae.config.block_out_channels))
    widest = channels[-2] if len(channels) > 1 else channels[0]
    itemsize = max(torch.finfo(_dtype(vae)).bits // 8, 2)
    per_frame = PEAK_FACTOR * widest * height * width * itemsize
    return max(1, budget // per_frame)


def _pixels(vae: AutoencoderKL, h: int, w: int) -> tuple[int, int]:
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return h * factor, w * factor


def _dtype(vae: AutoencoderKL) -> torch.dtype:
    return vae.decoder.conv_in.weight.dtype


def _device(vae: AutoencoderKL) -> torch.device:
    return vae.decoder.conv_in.weight.device


def _encode(vae: AutoencoderKL, pixels: torch.Tensor):
    return vae.encode(pixels.to(_device(vae), _dtype(vae))).latent_dist


def _decode(vae: AutoencoderKL, z: torch.Tensor, tiled: bool) -> torch.Tensor:
    z = z.to(_device(vae), _dtype(vae))
    return (vae.tiled_decode(z) if tiled else vae.decode(z)).sample


def _finite_or_upcast(vae: AutoencoderKL, run, *args):
    """`run(vae, *args)`; in fp16, again with the VAE in fp32 when the result is not finite."""
    out = run(vae, *args)
    if _dtype(vae) != torch.float16 or _finite(out):
        return out
    with upcast(vae):
        return run(vae, *args)


def _finite(out) -> bool:
    tensor = out if isinstance(out, torch.Tensor) else out.mean  # pixels, or a posterior
    return tensor.device.type == "meta" or bool(torch.isfinite(tensor).all())  # meta: estimates


@contextlib.contextmanager
def upcast(vae: AutoencoderKL) -> Iterator[None]:
    """The VAE in fp32 within the block, then back to its dtype (fp16 -> fp32 -> fp16 is exact)."""
    dtype = _dtype(vae)
    vae.to(torch.float32)
    try:
        yield
    finally:
        vae.to(dtype)
