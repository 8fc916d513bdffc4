"""SparseCtrl (Guo et al., 2023): a ControlNet encoder with motion modules that conditions a
video on a few keyframes (RGB images or scribbles) at chosen frame indices.

The released `v3_sd15_sparsectrl_{rgb,scribble}.ckpt` hold `{"controlnet": state_dict}`: the
image layers of a diffusers ControlNet built from the base UNet's config, one motion module
(with one temporal attention) after each down-block layer, and a condition embedding that takes
the condition plus a frame-mask channel. The RGB variant's condition is the VAE latent of the
keyframe and its embedding is a single convolution ("simplified"); the scribble variant takes
pixels through the usual ControlNet downsampling embedding. The noisy sample is not an input:
the encoder sees zeros there, so only the condition, the timestep and the text drive it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, ControlNetModel, UNet2DConditionModel
from torch import nn

from ..checkpoints.io import CheckpointError, check_keys, load_state_dict
from ..motion.config import MotionModuleConfig
from ..motion.frames import fold_frames, per_frame_inputs, select_frames, unfold_frames
from ..motion.module import MotionModules
from ..motion.unet import BlockInputs, FrameWindow, MotionUNet, time_embedding
from ..options import OptionError
from ..vae import encode_frames
from ..video.inputs import as_frames
from .controlnet import EMBEDDING, embedding_channels
from .residuals import Residuals, active

SIMPLIFIED = "controlnet_cond_embedding.weight"


class SparseControlNet(nn.Module):
    """`(sample, t, text, condition, mask)` for `b c f h w` videos -> ControlNet residuals for
    the UNet, folded per frame."""

    def __init__(self, controlnet: ControlNetModel, motion: MotionModules, latent: bool):
        super().__init__()
        self.net = MotionUNet(controlnet, motion)
        self.latent = latent  # RGB: the condition is VAE latents; scribble: pixels in [0, 1]

    @property
    def condition_channels(self) -> int:
        """Channels of the condition, without the mask channel."""
        return self.net.unet.config.conditioning_channels - 1

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        condition: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        scale: float = 1.0,
        windows: Sequence[FrameWindow] | None = None,
        embedded: torch.Tensor | None = None,
    ) -> Residuals:
        """diffusers' ControlNet forward on a zero sample, with the motion modules in its down
        blocks (over `windows` of frames when given: "views"). The condition goes in as
        `condition` and `mask` (b, c, f, h, w), or already through the condition embedding
        (`embedded`, frames folded: see :meth:`embed`), which does not change between steps."""
        b, _, f, _, _ = sample.shape
        shared = self.net.shares_text()  # text per video: projected once per video
        t, text = per_frame_inputs(timestep, encoder_hidden_states, b, f, sample.device, shared)
        host = self.net.unet
        x = torch.zeros_like(fold_frames(sample))
        if embedded is None:
            embedded = self.embed(condition, mask, sample.dtype)
        call = self.net.call(f, 1.0, windows, b * f)
        inputs = BlockInputs(time_embedding(host, x, t), text, None, call)
        x = host.conv_in(x) + embedded
        x, skips = self.net.down(x, inputs)
        x = self.net.mid(x, inputs)
        down = [block(s) * scale for s, block in zip(skips, host.controlnet_down_blocks)]
        return Residuals(down, host.controlnet_mid_block(x) * scale)

    def embed(self, condition: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype):
        """The condition embedding of `condition` and `mask` (b, c, f, h, w): ((b f), c', h, w)."""
        cond = fold_frames(torch.cat([condition, mask], dim=1).to(dtype))
        return self.net.unet.controlnet_cond_embedding(cond)


def load_sparsectrl(path: str | Path, unet: UNet2DConditionModel) -> SparseControlNet:
    """A released SparseCtrl encoder (`{"controlnet": ...}`, `.ckpt` or `.safetensors`), built
    for `unet`'s architecture and loaded strictly."""
    sd = load_state_dict(path)
    motion_sd = {k: v for k, v in sd.items() if ".motion_modules." in k}
    image_sd = {k: v for k, v in sd.items() if k not in motion_sd}
    pe = [v for k, v in motion_sd.items() if k.endswith("pos_encoder.pe")]
    motion_sd = {k: v for k, v in motion_sd.items() if not k.endswith("pos_encoder.pe")}
    if SIMPLIFIED in image_sd:
        channels, latent, embedding = image_sd[SIMPLIFIED].shape[1], True, None
    elif EMBEDDING in image_sd:
        channels, latent = image_sd[EMBEDDING].shape[1], False
        embedding = embedding_channels(image_sd)
    else:
        raise CheckpointError(
            path, f"not a SparseCtrl encoder: neither {SIMPLIFIED} nor {EMBEDDING} is in the file"
        )
    if not motion_sd:
        raise CheckpointError(path, "not a SparseCtrl encoder: it has no motion modules")
    controlnet = ControlNetModel.from_unet(
        unet,
        conditioning_channels=channels,
        conditioning_embedding_out_channels=embedding or (16, 32, 96, 256),
        load_weights_from_unet=False,
    )
    if latent:
        width = unet.config.block_out_channels[0]
        controlnet.controlnet_cond_embedding = nn.Conv2d(channels, width, 3, padding=1)
    check_keys(path, controlnet.state_dict(), image_sd, "a SparseCtrl encoder for this base model")
    controlnet.load_state_dict(image_sd)
    config = MotionModuleConfig.preset(
        "v3",
        block_out_channels=tuple(unet.config.block_out_channels),
        layers_per_block=unet.config.layers_per_block,
        attention_block_types=("Temporal_Self",),
        up_blocks=False,
        max_frames=pe[0].shape[1] if pe else 32,
    )
    motion = MotionModules(config)
    check_keys(path, motion.state_dict(), motion_sd, "SparseCtrl's motion modules")
    motion.load_state_dict(motion_sd)
    return SparseControlNet(controlnet, motion, latent).eval().requires_grad_(False)


@dataclass
class SparseCondition:
    """A SparseCtrl condition for every frame: zero with mask 0 except at the keyframes."""

    condition: torch.Tensor  # (b, c, f, h, w)
    mask: torch.Tensor  # (b, 1, f, h, w)


def sparse_condition(
    model: SparseControlNet,
    images: torch.Tensor,
    frames: list[int],
    num_frames: int,
    vae: AutoencoderKL,
    latent_size: tuple[int, int],
    sample_posterior: bool = False,
    generator: torch.Generator | None = None,
) -> SparseCondition:
    """Place keyframes `images` (b, 3, k, H, W) in [0, 1] at `frames`. RGB: encoded with the VAE
    (posterior mean, or a sample), scaled like the latents; scribble: pixels as they are."""
    b, _, k, _, _ = images.shape
    if k != len(frames):
        raise OptionError(f"{k} control images for {len(frames)} control frames")
    if any(not -num_frames <= i < num_frames for i in frames):
        raise OptionError(f"control frames {frames} outside a {num_frames}-frame video")
    frames = [int(i) % num_frames for i in frames]
    if model.latent:
        keys = encode_frames(vae, images, sample_posterior, generator)
    else:
        keys = images
    if keys.shape[1] != model.condition_channels:
        raise OptionError(
            f"the SparseCtrl encoder takes {model.condition_channels}-channel conditions, "
            f"got {keys.shape[1]}"
        )
    if not model.latent:
        latent_size = tuple(images.shape[-2:])
    condition = keys.new_zeros(b, keys.shape[1], num_frames, *latent_size)
    mask = keys.new_zeros(b, 1, num_frames, *latent_size)
    condition[:, :, frames] = keys
    mask[:, :, frames] = 1
    return SparseCondition(condition, mask)


@dataclass
class SparseCtrlInput:
    """A SparseCtrl encoder with its keyframe condition for one generation. The condition's
    embedding is computed at the first step, for every frame, and reused (it does not depend
    on the step)."""

    model: SparseControlNet
    condition: SparseCondition
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0
    embedded: torch.Tensor | None = None  # (b, c', f, h, w): every frame's embedding

    def residuals(self, sample, t, text, frames, step, num_steps, windows=None) -> Residuals | None:
        """Residuals for `sample` (b, c, len(frames), h, w), the video's `frames`; with
        `windows` ("views") its motion modules see those frame windows."""
        if self.scale == 0 or not active(step, num_steps, self.start, self.end):
            return None
        if self.embedded is None or self.embedded.dtype != sample.dtype:
            c = self.condition
            cond, mask = (x.to(sample.device) for x in (c.condition, c.mask))
            self.embedded = unfold_frames(self.model.embed(cond, mask, sample.dtype), cond.shape[2])
        part = select_frames(self.embedded, frames)
        part = part.repeat(sample.shape[0] // part.shape[0], 1, 1, 1, 1)
        return self.model(
            sample, t, text, scale=self.scale, windows=windows, embedded=fold_frames(part)
        )


def sparsectrl_input(
    model: SparseControlNet,
    images,
    frames: Sequence[int] | None,
    scale: float,
    sample_posterior: bool,
    num_frames: int,
    size: tuple[int, int],
    vae: AutoencoderKL,
    latent_size: tuple[int, int],
    generator: torch.Generator | None,
    device: torch.device | str | None = None,
) -> SparseCtrlInput:
    """Keyframe `images` (paths, PIL images or a tensor; resized to `size` (h, w)) placed at
    `frames` (default: 0, 1, ...) as the encoder's condition for one generation, on `device`
    (default: the encoder's)."""
    device = device or next(model.parameters()).device
    images = as_frames(images, *size, "control_images")
    frames = list(range(images.shape[2])) if frames is None else list(frames)
    condition = sparse_condition(
        model,
        images.to(device),
        frames,
        num_frames,
        vae,
        latent_size,
        sample_posterior=sample_posterior,
        generator=generator,
    )
    return SparseCtrlInput(model, condition, scale)
