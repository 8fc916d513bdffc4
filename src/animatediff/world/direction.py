"""Has a motion module (or MotionLoRA) learnt the direction of a motion? Its denoising loss on
rendered clips of that motion against the same clips played backwards, at fixed noise.

    python -m animatediff.world.direction pan-left [--motion-lora pan-left] [--clips 12]

A module that knows which way things go predicts the noise better on the clip as it was made;
one that only keeps frames alike does as well on either. Prints, per timestep, the loss forward,
backwards and the ratio (backwards / forward; 1.0 means no sense of direction), at each strength.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .motion import KINDS, make_clip

TIMESTEPS = (100, 300, 500, 700, 900)


@torch.no_grad()
def encode_clips(pipe, kind: str, clips: int, seed: int) -> tuple[torch.Tensor, list[str]]:
    """``clips`` clean rendered clips of ``kind`` as scaled latents (b, 4, f, h, w), captions."""
    latents, captions = [], []
    for i in range(clips):
        frames, caption, _ = make_clip(seed + i, kind=kind, size=pipe.default_size)
        pixels = torch.from_numpy(frames).permute(0, 3, 1, 2).float() / 127.5 - 1  # (f, 3, h, w)
        mean = pipe.vae.encode(pixels.to(pipe.device, pipe.vae.dtype)).latent_dist.mean
        latents.append(mean.transpose(0, 1).float() * pipe.vae.config.scaling_factor)
        captions.append(caption)
    return torch.stack(latents), captions


@torch.no_grad()
def direction_losses(
    pipe, latents: torch.Tensor, captions: Sequence[str], timesteps=TIMESTEPS, seed: int = 0
) -> dict[str, list[float]]:
    """{"forward": [...], "backward": [...]}: epsilon MSE per timestep, the same noise for both."""
    from ..training.config import NoiseConfig
    from ..training.loss import make_noise_scheduler

    scheduler = make_noise_scheduler(NoiseConfig())
    text = pipe.embed(list(captions), latents.shape[2], "", "", "linear").to(pipe.dtype)
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(latents.shape, generator=g) for _ in timesteps]
    out: dict[str, list[float]] = {"forward": [], "backward": []}
    for name, clip in (("forward", latents), ("backward", latents.flip(2))):
        for t, noise in zip(timesteps, noises):
            tt = torch.full((len(clip),), t)
            noisy = scheduler.add_noise(clip, noise, tt).to(pipe.device, pipe.dtype)
            pred = pipe.unet(noisy, tt.to(pipe.device), text).float().cpu()
            out[name].append(((pred - noise) ** 2).mean().item())
    return out


def main(argv: list[str] | None = None) -> None:
    from .. import AnimationPipeline, builtin

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS, help="the motion the clips show")
    p.add_argument("--motion-lora", help="a built-in MotionLoRA name or a file")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--seed", type=int, default=1000, help="clips are rendered from seed, seed+1...")
    args = p.parse_args(argv)
    pipe = AnimationPipeline.load()
    latents, captions = encode_clips(pipe, args.kind, args.clips, args.seed)
    if args.motion_lora:
        pipe.add_motion_lora(builtin.motion_lora_file(args.motion_lora), 1.0, name="lora")
    print(f"{args.clips} {args.kind} clips; loss forward / backward (ratio) per timestep")
    for strength in [0.0, 1.0] if args.motion_lora else [0.0]:
        if args.motion_lora:
            pipe.set_motion_lora_strength("lora", strength)
        losses = direction_losses(pipe, latents, captions)
        cells = [
            f"t={t}: {f:.4f} / {b:.4f} ({b / f:.2f})"
            for t, f, b in zip(TIMESTEPS, losses["forward"], losses["backward"])
        ]
        print(f"strength {strength:g}: " + "; ".join(cells))


if __name__ == "__main__":
    main()
