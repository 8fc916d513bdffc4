"""Insert motion modules into an unmodified diffusers `UNet2DConditionModel`.

Frames are folded into the batch (`b c f h w -> (b f) c h w`) so every image layer runs per frame,
as in the official 3D UNet. The motion modules run where the official UNet3D calls them: after each
resnet (+ attention) of the down and up blocks and, for v2, between the mid block's attention and
its second resnet. They are attached with forward hooks, so the 2D model's weights, module tree and
state dict stay untouched and `remove()` gives it back exactly as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from torch import nn

from .config import MotionModuleConfig
from .module import MotionModules, TemporalModule


def fold_frames(x: torch.Tensor) -> torch.Tensor:
    """b c f h w -> (b f) c h w"""
    b, c, f, h, w = x.shape
    return x.transpose(1, 2).reshape(b * f, c, h, w)


def unfold_frames(x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """(b f) c h w -> b c f h w"""
    bf, c, h, w = x.shape
    return x.view(bf // num_frames, num_frames, c, h, w).transpose(1, 2)


def _per_frame(t: torch.Tensor | None, batch: int, num_frames: int) -> torch.Tensor | None:
    """Repeat a per-video tensor for each frame; pass per-frame tensors through."""
    if t is None or t.shape[0] == batch * num_frames:
        return t
    if t.shape[0] != batch:
        raise ValueError(f"expected {batch} or {batch * num_frames} rows, got {t.shape[0]}")
    return t.repeat_interleave(num_frames, dim=0)


class MotionUNet(nn.Module):
    """A 2D UNet with motion modules: `(b, c, f, h, w)` noisy latents -> `(b, c, f, h, w)` output.

    `unet(sample, timestep, encoder_hidden_states)` takes one text embedding per video
    `(b, n, d)` (or one per frame, `(b * f, n, d)`, for prompt travel) and a scalar or `(b,)`
    timestep, exactly like the official `UNet3DConditionModel`, and returns the tensor itself.
    """

    def __init__(self, unet: UNet2DConditionModel, motion: MotionModules):
        super().__init__()
        self.unet = unet
        self.motion = motion
        self.motion_scale: float | torch.Tensor = 1.0
        self.gradient_checkpointing = False  # recompute motion modules in backward (training)
        self._windows: list[tuple[list[int], torch.Tensor]] | None = None
        self._num_frames: int | None = None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._check_layout()
        self._attach()

    @property
    def config(self) -> MotionModuleConfig:
        return self.motion.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    # -- insertion ---------------------------------------------------------------------------
    def _sites(self) -> list[tuple[nn.Module, TemporalModule]]:
        """(2D layer whose output feeds a motion module, that module), in execution order."""
        sites = []
        pairs = list(zip(self.unet.down_blocks, self.motion.down_blocks))
        if self.motion.mid_block is not None:
            pairs.append((self.unet.mid_block, self.motion.mid_block))
        pairs += list(zip(self._host_blocks("up_blocks"), self.motion.up_blocks))
        for block, motion_block in pairs:
            attentions = getattr(block, "attentions", None)
            layers = attentions if attentions else block.resnets
            sites += list(zip(layers, motion_block.motion_modules))
        return sites

    def _check_layout(self) -> None:
        unet, cfg = self.unet, self.motion.config
        problems = []
        if tuple(unet.config.block_out_channels) != cfg.block_out_channels:
            problems.append(
                f"UNet block_out_channels {tuple(unet.config.block_out_channels)} != "
                f"motion module {cfg.block_out_channels}"
            )
        if len(self.motion.up_blocks) not in (0, len(self._host_blocks("up_blocks"))):
            problems.append("the motion module has up-block modules but the model has no up blocks")
        for name, blocks, motion_blocks in (
            ("down", unet.down_blocks, self.motion.down_blocks),
            ("up", self._host_blocks("up_blocks"), self.motion.up_blocks),
        ):
            for i, (block, mb) in enumerate(zip(blocks, motion_blocks)):
                if len(block.resnets) != len(mb.motion_modules):
                    problems.append(
                        f"{name}_blocks.{i}: {len(block.resnets)} resnets but "
                        f"{len(mb.motion_modules)} motion modules"
                    )
        if problems:
            raise ValueError(
                "motion module does not fit this UNet (is it for another base model, e.g. SDXL?): "
                + "; ".join(problems)
            )

    def _attach(self) -> None:
        for layer, module in self._sites():
            self._handles.append(layer.register_forward_hook(self._motion_hook(module)))
        if self.motion.config.groupnorm_across_frames:
            for norm in self._video_groupnorms():
                self._handles.append(norm.register_forward_pre_hook(self._gn_pre))
                self._handles.append(norm.register_forward_hook(self._gn_post))

    def _host_blocks(self, name: str) -> list[nn.Module]:
        """A block list of the host model; a ControlNet encoder has no up blocks."""
        return list(getattr(self.unet, name, None) or [])

    def _video_groupnorms(self) -> list[nn.GroupNorm]:
        """The norms that v1's UNet3D applies over all frames of a video at once."""
        norms: list = [getattr(self.unet, "conv_norm_out", None)]
        blocks = [*self.unet.down_blocks, self.unet.mid_block, *self._host_blocks("up_blocks")]
        for block in blocks:
            for resnet in block.resnets:
                norms += [resnet.norm1, resnet.norm2]
        return [n for n in norms if isinstance(n, nn.GroupNorm)]

    def _motion_hook(self, module: TemporalModule) -> Callable:
        def hook(layer, args, output):
            if self._num_frames is None:  # called as a plain 2D UNet
                return output
            if isinstance(output, tuple):
                return (self._run_motion(module, output[0]), *output[1:])
            if hasattr(output, "sample"):
                output.sample = self._run_motion(module, output.sample)
                return output
            return self._run_motion(module, output)

        return hook

    def _run_motion(self, module: TemporalModule, x: torch.Tensor) -> torch.Tensor:
        if self._windows is not None:
            out = self._windowed(module, x)
        elif self.gradient_checkpointing and torch.is_grad_enabled():
            out = torch.utils.checkpoint.checkpoint(
                module, x, self._num_frames, use_reentrant=False
            )
        else:
            out = module(x, self._num_frames)
        scale = self.motion_scale
        if isinstance(scale, float | int) and scale == 1:
            return out
        # Scale the module's contribution (its output minus the residual it adds).
        if isinstance(scale, torch.Tensor) and scale.ndim == 1:  # per frame
            scale = scale.to(x).repeat(x.shape[0] // scale.shape[0]).view(-1, 1, 1, 1)
        return x + (out - x) * scale

    @contextlib.contextmanager
    def frame_windows(self, windows: list[tuple[list[int], torch.Tensor]]):
        """Within the block, each motion module runs on these frame windows and fuses their
        outputs per frame with the given weights ("views": the image layers see all frames)."""
        self._windows = windows
        try:
            yield
        finally:
            self._windows = None

    def _windowed(self, module: TemporalModule, x: torch.Tensor) -> torch.Tensor:
        from ..pipeline.context import WindowAccumulator

        video = unfold_frames(x, self._num_frames)
        fused = WindowAccumulator.like(video)
        for indices, weights in self._windows:
            part = module(fold_frames(video[:, :, indices]), len(indices))
            fused.add(indices, unfold_frames(part, len(indices)), weights)
        return fold_frames(fused.result().to(x.dtype))

    def _gn_pre(self, norm, args):
        if self._num_frames is None:
            return None
        x = args[0]
        return (unfold_frames(x, self._num_frames).contiguous(),)

    def _gn_post(self, norm, args, output):
        if self._num_frames is None:
            return None
        return fold_frames(output)

    def remove(self) -> UNet2DConditionModel:
        """Detach the motion modules; returns the 2D UNet exactly as it was before."""
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        return self.unet

    # -- forward -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def video(self, num_frames: int):
        """Within the block, calls of the host model on `(b f) c h w` inputs run the motion
        modules over `num_frames` frames (used to run a ControlNet encoder host)."""
        if not self._handles:
            raise RuntimeError("motion modules were removed from this model")
        self._num_frames = num_frames
        try:
            yield
        finally:
            self._num_frames = None

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        **unet_kwargs,
    ) -> torch.Tensor:
        """sample (b, c, f, h, w) -> noise prediction (b, c_out, f, h, w).

        Extra keyword arguments (e.g. ControlNet residuals, already folded per frame) go to the
        2D UNet unchanged.
        """
        b, _, f, _, _ = sample.shape
        timestep, text = per_frame_inputs(timestep, encoder_hidden_states, b, f, sample.device)
        with self.video(f):
            out = self.unet(fold_frames(sample), timestep, text, return_dict=False, **unet_kwargs)[
                0
            ]
        return unfold_frames(out, f)


def per_frame_inputs(
    timestep: torch.Tensor | float | int,
    encoder_hidden_states: torch.Tensor,
    batch: int,
    num_frames: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Timestep and text for frames folded into the batch."""
    timestep = torch.as_tensor(timestep, device=device)
    if timestep.ndim == 1 and timestep.shape[0] == batch:
        timestep = timestep.repeat_interleave(num_frames)
    return timestep, _per_frame(encoder_hidden_states, batch, num_frames)
