"""Between pixels and latents, frame by frame in chunks (so long videos fit in memory)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL


def encode_frames(
    vae: AutoencoderKL,
    frames: torch.Tensor,
    sample: bool = False,
    generator: torch.Generator | None = None,
    chunk_size: int = 16,
) -> torch.Tensor:
    """(b, 3, f, H, W) in [0, 1] -> (b, 4, f, h, w) scaled latents: the posterior mean (the
    deterministic choice), or a sample from it."""
    b, _, f, _, _ = frames.shape
    pixels = (frames * 2 - 1).transpose(1, 2).reshape(b * f, 3, *frames.shape[-2:])
    latents = []
    for chunk in pixels.split(chunk_size):
        posterior = vae.encode(chunk.to(vae.device, vae.dtype)).latent_dist
        latents.append((posterior.sample(generator) if sample else posterior.mean).float())
    flat = torch.cat(latents) * vae.config.scaling_factor
    return flat.view(b, f, *flat.shape[1:]).transpose(1, 2)


def decode_latents(vae: AutoencoderKL, latents: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
    """(b, 4, f, h, w) latents -> (b, 3, f, H, W) float32 frames in [0, 1], on the CPU."""
    b, c, f, h, w = latents.shape
    flat = (latents / vae.config.scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)
    flat = flat.to(vae.dtype)
    pixels = [vae.decode(chunk).sample.float().cpu() for chunk in flat.split(chunk_size)]
    video = torch.cat(pixels)
    video = video.view(b, f, *video.shape[1:]).transpose(1, 2)
    return (video / 2 + 0.5).clamp(0, 1)
