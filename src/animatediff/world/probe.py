"""Does the base model read its caption? Its denoising loss on rendered stills with the true
caption, against the same stills and noise with the shape word changed or with the object's and
the background's colours swapped, per timestep.

    python -m animatediff.world.probe [--base FOLDER] [--checkpoint DIR] [--images 96]

A ratio (changed / true) of 1.0 means the model ignores that part of the caption at that noise
level; layout and colours are decided at high noise (t = 500-900), so that is where a model
that follows its prompt must be above 1. The swap needs a text encoder that knows which colour
word names the background: a bag of words (a frozen random encoder) scores 1.0 there whatever
the UNet learns. Cheap (seconds on a CPU): run it on a base while it trains, with
``--checkpoint`` a trainer checkpoint (``OUTPUT/checkpoints/step-N``) of an ``image_finetune``
run over ``--base``.
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from ..builtin.model import builtin_model
from ..checkpoints.base import load_base
from ..checkpoints.io import load_state_dict
from ..pipeline.prompt import encode_prompts
from ..training.config import NoiseConfig
from ..training.loss import make_noise_scheduler
from .motion import KINDS
from .scene import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES, Scene, caption, random_scene, render

TIMESTEPS = (100, 300, 500, 700, 900)
# Colours that can be either the object's or the background's, so a swapped caption is one the
# world could have written.
SWAPPABLE = tuple(c for c in OBJECT_COLOURS if c in BACKGROUND_COLOURS)


def probe_scenes(n: int, seed: int = 5000) -> list[Scene]:
    """``n`` one-sprite scenes whose object and background colours are both ``SWAPPABLE``."""
    rng = np.random.default_rng(seed)
    return [random_scene(rng, 1, colours=SWAPPABLE, backgrounds=SWAPPABLE) for _ in range(n)]


# The motion words of each caption kind the probe can use (``--kind``).
KIND_WORDS = {"move": {"direction": "left", "speed": "slowly"}}


def captions(scene: Scene, kind: str = "static") -> dict[str, str]:
    """The true caption (of ``kind``'s grammar), one with the next shape's word, one with the
    colours swapped."""
    sprite = scene.sprites[0]
    shape = SHAPES[(SHAPES.index(sprite.shape) + 1) % len(SHAPES)]
    swapped = Scene((replace(sprite, colour=scene.background),), sprite.colour)
    words = KIND_WORDS.get(kind, {})
    return {
        "true": caption(scene, kind, **words),
        "shape": caption(replace(scene, sprites=(replace(sprite, shape=shape),)), kind, **words),
        "swap": caption(swapped, kind, **words),
    }


@torch.no_grad()
def caption_losses(
    image,
    scenes: list[Scene],
    timesteps=TIMESTEPS,
    seed: int = 0,
    batch: int = 32,
    kind: str = "static",
) -> dict[str, list[float]]:
    """Epsilon MSE per timestep for each caption variant of ``captions`` (``image``: an
    ``ImageModel`` with unet, vae, tokenizer and text encoder); every variant of a still gets
    the same noise."""
    scheduler = make_noise_scheduler(NoiseConfig())
    unet, vae = image.unet, image.vae
    device, dtype = unet.device, unet.dtype
    g = torch.Generator().manual_seed(seed)
    totals: dict[str, list[float]] = {}
    for start in range(0, len(scenes), batch):
        chunk = scenes[start : start + batch]
        pixels = torch.from_numpy(np.stack([render(s, vae.config.sample_size) for s in chunk]))
        pixels = pixels.permute(0, 3, 1, 2).float() / 127.5 - 1
        latents = vae.encode(pixels.to(device, vae.dtype)).latent_dist.mean.float()
        latents = latents * vae.config.scaling_factor
        texts = [captions(s, kind) for s in chunk]
        for t_index, t in enumerate(timesteps):
            noise = torch.randn(latents.shape, generator=g).to(device)
            tt = torch.full((len(chunk),), t, device=device)
            noisy = scheduler.add_noise(latents, noise, tt).to(dtype)
            for name in texts[0]:
                prompts = [variant[name] for variant in texts]
                text = encode_prompts(image.tokenizer, image.text_encoder, prompts).to(dtype)
                pred = unet(noisy, tt, text, return_dict=False)[0].float()
                loss = ((pred - noise) ** 2).mean().item() * len(chunk)
                totals.setdefault(name, [0.0] * len(timesteps))[t_index] += loss
    return {name: [v / len(scenes) for v in values] for name, values in totals.items()}


def caption_ratios(
    image, images: int = 96, timesteps=TIMESTEPS, seed: int = 5000, kind: str = "static"
) -> dict[str, list[float]]:
    """{"shape": [...], "swap": [...]}: the loss with the changed caption over the loss with
    the true one, per timestep, on ``images`` probe stills captioned in ``kind``'s grammar
    (a still is a clip's first frame, so any kind's caption is true of it)."""
    losses = caption_losses(image, probe_scenes(images, seed), timesteps, seed, kind=kind)
    return {
        name: [x / y for x, y in zip(losses[name], losses["true"])] for name in ("shape", "swap")
    }


def load_checkpoint(image, folder: str | Path) -> None:
    """Put an ``image_finetune`` trainer checkpoint's weights (UNet, and the text encoder if it
    was trained) into ``image``."""
    weights = load_state_dict(Path(folder) / "trainable.safetensors")
    for prefix, module in (("unet2d.", image.unet), ("text_encoder.", image.text_encoder)):
        part = {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}
        if part:
            module.load_state_dict(part)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base", help="a diffusers base folder (default: the built-in base)")
    p.add_argument("--checkpoint", help="a trainer checkpoint folder of a run over --base")
    p.add_argument("--images", type=int, default=96)
    p.add_argument("--seed", type=int, default=5000)
    p.add_argument("--kind", default="static", choices=KINDS, help="the captions' grammar")
    args = p.parse_args(argv)
    image = load_base(args.base or builtin_model().base)
    if args.checkpoint:
        load_checkpoint(image, args.checkpoint)
    ratios = caption_ratios(image, args.images, TIMESTEPS, args.seed, args.kind)
    print(f"loss ratio, changed caption / true caption ({args.images} stills, {args.kind})")
    print("timestep      " + " ".join(f"{t:>6}" for t in TIMESTEPS))
    for name, label in (("shape", "shape word"), ("swap", "colours swap")):
        print(f"{label:<13} " + " ".join(f"{r:6.3f}" for r in ratios[name]))


if __name__ == "__main__":
    main()
