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
Noise is drawn as the module was trained (its ``shared_noise``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

import torch

from .. import builtin
from ..pipeline import AnimationPipeline
from ..training.config import NoiseConfig
from ..training.loss import make_noise_scheduler
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
    """Epsilon MSE per timestep of each ``name: (clips, noise-arranger)`` variant. Noise follows
    the motion module's prior (``config.shared_noise``): every variant draws the same noise, its
    frames' own noise rearranged as its clips were, the part common to a clip left in place."""
    scheduler = make_noise_scheduler(NoiseConfig())
    shared = pipe.unet.config.shared_noise
    first = next(iter(variants.values()))[0]
    text = pipe.encode(list(captions)).to(pipe.dtype)
    g = torch.Generator().manual_seed(seed)
    own = [torch.randn(first.shape, generator=g) for _ in timesteps]
    common = [torch.randn((*first.shape[:2], 1, *first.shape[3:]), generator=g) for _ in timesteps]
    out: dict[str, list[float]] = {}
    for name, (clip, arrange) in variants.items():
        out[name] = []
        for t, e, c in zip(timesteps, own, common):
            noise = shared**0.5 * c + (1 - shared) ** 0.5 * arrange(e)
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
    on their frames mixed across clips (``mix_frames``; each frame's own noise travels with it,
    noise common to a clip stays with the clip, so mixing changes content, not noise).

    Without a motion module every frame is denoised alone, so both are the same (exactly, for
    a module trained without shared noise; in expectation otherwise); the ratio mixed / clips
    is how much a module draws on the other frames' content at that noise level."""
    if len(latents) < 2:
        raise ValueError("coherence_losses needs at least 2 clips to mix")
    variants = {"clips": (latents, _same), "mixed": (mix_frames(latents), mix_frames)}
    return _losses(pipe, variants, [""] * len(latents), timesteps, seed, motion_scale)


def _row(timesteps, a: list[float], b: list[float]) -> str:
    return "; ".join(f"t={t}: {x:.4f} / {y:.4f} ({y / x:.2f})" for t, x, y in zip(timesteps, a, b))


def main(argv: list[str] | None = None) -> None:
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
