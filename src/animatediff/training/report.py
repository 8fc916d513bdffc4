"""What a run shows of itself: validation clips sampled during training and the loss curve."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from ..checkpoints.base import ImageModel
from ..motion import MotionModuleConfig, MotionModules, MotionUNet
from ..pipeline import AnimationPipeline
from ..pipeline.presets import preset_settings
from .config import Config
from .stages import TrainModel


def sampling_settings(config: Config) -> dict:
    """How validation samples: a distilled student as `--preset auto` will sample it (the LCM
    sampler at its step count), anything else with the validation settings."""
    v = config.validation
    if config.stage != "distill":
        return {"num_inference_steps": v.steps, "guidance_scale": v.guidance_scale}
    steps = config.distill.num_inference_steps
    settings = preset_settings("animatelcm", {"preset": "animatelcm", "steps": steps})
    settings.pop("lora_strength", None)
    return settings


@torch.no_grad()
def validate(
    image: ImageModel, model: TrainModel, config: Config, folder: Path, step: int
) -> list[Path]:
    """`folder/step-N-i.gif` for each validation prompt; image stages sample single frames
    through a throw-away motion module."""
    v = config.validation
    motion_unet = model.motion_unet
    temporary = None
    if motion_unet is None:  # image stages: frames without a motion module
        cfg = MotionModuleConfig.preset(
            "v3", block_out_channels=tuple(model.unet2d.config.block_out_channels)
        )
        device = next(model.unet2d.parameters()).device
        temporary = motion_unet = MotionUNet(model.unet2d, MotionModules(cfg).to(device))
    was_training = model.training
    model.eval()
    pipe = AnimationPipeline(image, motion_unet)
    paths = []
    try:
        for i, prompt in enumerate(v.prompts):
            video = pipe(
                prompt,
                num_frames=v.num_frames if model.video else 1,
                height=config.data.sample_size[1],
                width=config.data.sample_size[0],
                seed=v.seed + i,
                progress=False,
                **sampling_settings(config),
            )
            paths += video.save(folder / f"step-{step:08d}-{i}.gif", overwrite=True)
    finally:
        if temporary is not None:
            temporary.remove()
        model.train(was_training)
    return paths


def plot_losses(metrics: Path, png: Path) -> None:
    """A small loss-curve image drawn with Pillow (no plotting dependency)."""
    if not metrics.exists():
        return
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-12)
    points = [
        (pad + (s - steps[0]) / span_x * (w - 2 * pad), h - pad - (v - lo) / span_y * (h - 2 * pad))
        for s, v in zip(steps, losses)
    ]
    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    if len(points) > 1:
        draw.line(points, fill="blue", width=2)
    draw.text(
        (pad, 10), f"loss {lo:.4g} .. {hi:.4g}, steps {steps[0]} .. {steps[-1]}", fill="black"
    )
    img.save(png)
