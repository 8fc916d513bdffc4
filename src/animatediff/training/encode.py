"""Pre-encode a dataset once: each clip's VAE posterior (mean and std) in its own file, so that
training reads latents instead of decoding and encoding video at every step. The clip (start,
flip) is fixed at encoding time; the posterior is still sampled afresh at every step."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..builtin.model import resolve
from ..checkpoints.base import load_base
from ..checkpoints.io import save_state_dict
from ..motion.frames import fold_frames, unfold_frames
from .config import Config
from .data import VideoClips, check_clips, find_clips


@torch.no_grad()
def encode_dataset(config: Config, folder: str | Path, device: str = "cpu") -> int:
    """Write `folder/000000.safetensors`, ...; returns the number of clips written."""
    frames = config.data.num_frames if config.video else 1
    clips = find_clips(config.data)
    check_clips(clips, frames)
    dataset = VideoClips(clips, config.data, frames, config.train.seed)
    vae = load_base(resolve(config.base)[0]).vae.to(device).eval()
    folder = Path(folder)
    written = 0
    for i in tqdm(range(len(dataset)), desc="encoding"):
        sample = dataset[i]
        if sample["skipped"]:  # clip i is unreadable; its stand-in is encoded at its own index
            for problem in sample["skipped"]:
                print(f"skipped {problem}", file=sys.stderr)
            continue
        pixels = sample["pixels"].to(device)[None]  # (1, 3, f, H, W)
        dist = vae.encode(fold_frames(pixels)).latent_dist  # frames as a batch
        mean, std = (unfold_frames(t, frames)[0].contiguous().cpu() for t in (dist.mean, dist.std))
        save_state_dict(
            {"mean": mean, "std": std},
            folder / f"{i:06d}.safetensors",
            metadata={"caption": sample["caption"]},
        )
        written += 1
    return written
