"""Standard SD1.5 ControlNets (diffusers `ControlNetModel`), applied frame by frame."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from ..checkpoints.io import CheckpointError, check_keys, load_state_dict
from ..motion.frames import fold_frames, per_frame_inputs, select_frames, unfold_frames
from ..motion.unet import time_embedding
from ..options import OptionError
from ..video.inputs import as_frames
from .residuals import Residuals, active

EMBEDDING = "controlnet_cond_embedding.conv_in.weight"


def embedding_channels(sd: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """Widths of ControlNet's condition embedding: conv_in, then pairs (conv, strided conv)."""
    channels = [sd[EMBEDDING].shape[0]]
    i = 1
    while f"controlnet_cond_embedding.blocks.{i}.weight" in sd:
        channels.append(sd[f"controlnet_cond_embedding.blocks.{i}.weight"].shape[0])
        i += 2
    return tuple(channels)


def load_controlnet(
    path: str | Path, unet: UNet2DConditionModel | None = None, dtype: torch.dtype = torch.float32
) -> ControlNetModel:
    """A diffusers ControlNet folder (or hub id), or one file: diffusers-layout keys (loaded
    into a ControlNet shaped like `unet`) or the original `control_model.*`/`input_blocks.*`
    layout (converted by diffusers' single-file loader, with `unet`'s config, offline)."""
    path = str(path)
    if Path(path).is_dir() or not Path(path).exists():
        return ControlNetModel.from_pretrained(path, torch_dtype=dtype).eval()
    sd = load_state_dict(path)
    if unet is None:
        raise ValueError(f"{path}: a single-file ControlNet needs the base UNet for its config")
    if "controlnet_mid_block.weight" in sd and EMBEDDING in sd:  # already in diffusers' layout
        model = ControlNetModel.from_unet(
            unet,
            conditioning_embedding_out_channels=embedding_channels(sd),
            conditioning_channels=sd[EMBEDDING].shape[1],
            load_weights_from_unet=False,
        )
        check_keys(path, model.state_dict(), sd, "a ControlNet for this base model")
        model.load_state_dict(sd)
        return model.to(dtype=dtype).eval()
    if not any(k.startswith(("control_model.", "input_blocks.", "input_hint_block.")) for k in sd):
        raise CheckpointError(path, "not a ControlNet: no controlnet_* or control_model.* keys")
    with tempfile.TemporaryDirectory() as config_dir:
        ControlNetModel.from_unet(unet, load_weights_from_unet=False).save_config(config_dir)
        return ControlNetModel.from_single_file(path, config=config_dir, torch_dtype=dtype).eval()


@dataclass
class ControlNetInput:
    """One ControlNet with its images for every frame, (b, 3, f, H, W) in [0, 1]. The images'
    condition embedding does not depend on the step: it is computed at the first step, for every
    frame, and reused."""

    model: ControlNetModel
    images: torch.Tensor
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    embedded: torch.Tensor | None = None  # (b, c', f, h, w)

    def residuals(self, sample, t, text, frames, step, num_steps, windows=None) -> Residuals | None:
        """Residuals for `sample` (b, c, len(frames), h, w), the video's `frames`."""
        if self.scale == 0 or not active(step, num_steps, self.start, self.end):
            return None
        b, _, f, _, _ = sample.shape
        t, text = per_frame_inputs(t, text, b, f, sample.device)
        if not plain(self.model):  # beyond SD1.5's layout: diffusers' own forward
            images = select_frames(self.images, frames).to(sample.device, sample.dtype)
            images = images.repeat(b // self.images.shape[0], 1, 1, 1, 1)
            down, mid = self.model(
                fold_frames(sample), t, text, controlnet_cond=fold_frames(images),
                conditioning_scale=self.scale, return_dict=False,
            )  # fmt: skip
            return Residuals(list(down), mid)
        if self.embedded is None or self.embedded.dtype != sample.dtype:
            images = self.images.to(sample.device, sample.dtype)
            # contiguous: images read from files may be strided channels-last, which changes
            # the convolution's rounding
            folded = fold_frames(images).contiguous()
            self.embedded = unfold_frames(embed(self.model, folded), images.shape[2])
        part = select_frames(self.embedded, frames)
        part = part.repeat(b // part.shape[0], 1, 1, 1, 1)
        return controlnet_forward(
            self.model, fold_frames(sample), t, text, fold_frames(part), self.scale
        )


def plain(model: ControlNetModel) -> bool:
    """An SD1.5-style ControlNet (no class or added embeddings, no pooled conditions): the ones
    :func:`controlnet_forward` computes."""
    cfg = model.config
    return (
        model.class_embedding is None
        and cfg.addition_embed_type is None
        and not (cfg.global_pool_conditions)
    )


def embed(model: ControlNetModel, images: torch.Tensor) -> torch.Tensor:
    """The condition embedding of images ((b f), 3, H, W) in [0, 1], as diffusers' forward
    computes it (channel order included)."""
    if model.config.controlnet_conditioning_channel_order == "bgr":
        images = torch.flip(images, dims=[1])
    return model.controlnet_cond_embedding(images)


def controlnet_forward(
    model: ControlNetModel,
    sample: torch.Tensor,
    timestep: torch.Tensor,
    text: torch.Tensor,
    embedded: torch.Tensor,
    scale: float,
) -> Residuals:
    """diffusers' `ControlNetModel.forward` for an SD1.5-style ControlNet (:func:`plain`), frames
    folded, given the condition already embedded (:func:`embed`)."""
    emb = time_embedding(model, sample, timestep)
    x = model.conv_in(sample) + embedded
    skips = [x]
    for block in model.down_blocks:
        if getattr(block, "has_cross_attention", False):
            x, res = block(hidden_states=x, temb=emb, encoder_hidden_states=text)
        else:
            x, res = block(hidden_states=x, temb=emb)
        skips += res
    if model.mid_block is not None:
        cross = getattr(model.mid_block, "has_cross_attention", False)
        x = (
            model.mid_block(x, emb, encoder_hidden_states=text)
            if cross
            else model.mid_block(x, emb)
        )
    down = [block(s) * scale for s, block in zip(skips, model.controlnet_down_blocks)]
    return Residuals(down, model.controlnet_mid_block(x) * scale)


def controlnet_inputs(
    models: list[ControlNetModel],
    images,
    scales: float | Sequence[float],
    starts: float | Sequence[float],
    ends: float | Sequence[float],
    num_frames: int,
    size: tuple[int, int],
    device: torch.device,
) -> list[ControlNetInput]:
    """One :class:`ControlNetInput` per loaded ControlNet: its frames (one entry per ControlNet;
    with a single ControlNet its frames may be given directly) resized to `size` (h, w), and its
    scale / start / end (one number for all, or one each)."""
    n = len(models)
    if n == 0:
        raise OptionError("controlnet_images need ControlNets: load(..., controlnets=[...])")
    one_each = n > 1 or (isinstance(images, list | tuple) and len(images) == 1)
    per_net = list(images) if one_each else [images]
    if len(per_net) != n:
        raise OptionError(f"{len(per_net)} controlnet_images for {n} ControlNets")
    inputs = []
    for model, frames, scale, start, end in zip(
        models,
        per_net,
        one_per("controlnet_scale", scales, n),
        one_per("controlnet_start", starts, n),
        one_per("controlnet_end", ends, n),
    ):
        frames = as_frames(frames, *size, "controlnet_images")
        if frames.shape[2] < num_frames:
            raise OptionError(
                f"controlnet_images has {frames.shape[2]} frames for {num_frames} video frames"
            )
        inputs.append(
            ControlNetInput(model, frames[:, :, :num_frames].to(device), scale, start, end)
        )
    return inputs


def one_per(name: str, value: float | Sequence[float], n: int) -> list[float]:
    """A number for each of `n` items: one for all, or a sequence of exactly `n`."""
    values = [float(value)] * n if isinstance(value, int | float) else [float(v) for v in value]
    if len(values) == 1 and n > 1:
        values = values * n
    if len(values) != n:
        raise OptionError(f"{len(values)} values of {name} for {n} ControlNets")
    return values
