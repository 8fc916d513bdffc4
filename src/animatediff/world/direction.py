"""What has a motion module (or MotionLoRA) learnt of time? Its denoising loss on rendered clips
at fixed noise, against the same clips played backwards (direction) or with their frames mixed
across clips (coherence).

    python -m animatediff.world.direction pan-left [--motion-lora pan-left] [--clips 12]
    python -m animatediff.world.direction static --coherence [--motion-module FILE]

A module that knows which way things go predicts the noise better on the clip as it was made;
one that only keeps frames alike does as well on either. Prints, per timestep, the loss forward,
backwards and the ratio (backwards / forward; 1.0 means no sense of direction), at each strength.
``--coherence`` prints the loss on the clips and on frames mixed across them, with the module
and without it (1.0 exactly): how much the module draws on the other frames at each noise
level. Where it does not (high noise, where layout and colours are decided), frames flicker.
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


def _losses(
    pipe, variants: dict, captions: Sequence[str], timesteps, seed: int, motion_scale: float = 1.0
) -> dict[str, list[float]]:
    """Epsilon MSE per timestep of each ``name: (clips, noise-arranger)`` variant; every
    variant draws the same noise, rearranged as its clips were."""
    from ..training.config import NoiseConfig
    from ..training.loss import make_noise_scheduler

    scheduler = make_noise_scheduler(NoiseConfig())
    first = next(iter(variants.values()))[0]
    text = pipe.encode(list(captions)).to(pipe.dtype)
    g = torch.Generator().manual_seed(seed)
    noises = [torch.randn(first.shape, generator=g) for _ in timesteps]
    out: dict[str, list[float]] = {}
    for name, (clip, arrange) in variants.items():
        out[name] = []
        for t, noise in zip(timesteps, noises):
            noise = arrange(noise)
            tt = torch.full((len(clip),), t)
            noisy = scheduler.add_noise(clip, noise, tt).to(pipe.device, pipe.dtype)
            pred = pipe.unet(noisy, tt.to(pipe.device), text, motion_scale=motion_scale)
            pred = pred.float().cpu()
            out[name].append(((pred - noise) ** 2).mean().item())
    return out


def _same(x: torch.Tensor) -> torch.Tensor:
    return x


@torch.no_grad()
def direction_losses(
    pipe, latents: torch.Tensor, captions: Sequence[str], timesteps=TIMESTEPS, seed: int = 0
) -> dict[str, list[float]]:
    """{"forward": [...], "backward": [...]}: epsilon MSE per timestep, the same noise for both."""
    variants = {"forward": (latents, _same), "backward": (latents.flip(2), _same)}
    return _losses(pipe, variants, captions, timesteps, seed)


def mix_frames(x: torch.Tensor) -> torch.Tensor:
    """(b, c, f, h, w) -> the same frames, frame f of clip i taken from clip (i + f) mod b."""
    b, f = x.shape[0], x.shape[2]
    return torch.stack([x[(torch.arange(b) + i) % b, :, i] for i in range(f)], dim=2)


@torch.no_grad()
def coherence_losses(
    pipe, latents: torch.Tensor, timesteps=TIMESTEPS, seed: int = 0, motion_scale: float = 1.0
) -> dict[str, list[float]]:
    """{"clips": [...], "mixed": [...]}: unconditional epsilon MSE per timestep on the clips and
    on their frames mixed across clips (``mix_frames``; the noise travels with its frame).

    Without a motion module every frame is denoised alone, so both are the same; the ratio
    mixed / clips is how much a module draws on the other frames at that noise level."""
    if len(latents) < 2:
        raise ValueError("coherence_losses needs at least 2 clips to mix")
    variants = {"clips": (latents, _same), "mixed": (mix_frames(latents), mix_frames)}
    return _losses(pipe, variants, [""] * len(latents), timesteps, seed, motion_scale)


def _row(timesteps, a: list[float], b: list[float]) -> str:
    return "; ".join(f"t={t}: {x:.4f} / {y:.4f} ({y / x:.2f})" for t, x, y in zip(timesteps, a, b))


def main(argv: list[str] | None = None) -> None:
    from .. import AnimationPipeline, builtin

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("kind", choices=KINDS, help="the motion the clips show")
    p.add_argument("--motion-lora", help="a built-in MotionLoRA name or a file")
    p.add_argument("--motion-module", help="a motion module file (default: the built-in one)")
    p.add_argument("--coherence", action="store_true", help="mix frames instead of reversing")
    p.add_argument("--clips", type=int, default=12)
    p.add_argument("--seed", type=int, default=1000, help="clips are rendered from seed, seed+1...")
    args = p.parse_args(argv)
    pipe = AnimationPipeline.load(motion_module=args.motion_module)
    latents, captions = encode_clips(pipe, args.kind, args.clips, args.seed)
    if args.coherence:
        print(f"{args.clips} {args.kind} clips; loss clips / frames mixed (ratio) per timestep")
        for scale in (1.0, 0.0):
            losses = coherence_losses(pipe, latents, motion_scale=scale)
            name = "with the motion module" if scale else "without it"
            print(f"{name}: " + _row(TIMESTEPS, losses["clips"], losses["mixed"]))
        return
    if args.motion_lora:
        pipe.add_motion_lora(builtin.motion_lora_file(args.motion_lora), 1.0, name="lora")
    print(f"{args.clips} {args.kind} clips; loss forward / backward (ratio) per timestep")
    for strength in [0.0, 1.0] if args.motion_lora else [0.0]:
        if args.motion_lora:
            pipe.set_motion_lora_strength("lora", strength)
        losses = direction_losses(pipe, latents, captions)
        print(f"strength {strength:g}: " + _row(TIMESTEPS, losses["forward"], losses["backward"]))


if __name__ == "__main__":
    main()
