"""Motion modules run inside an unmodified diffusers `UNet2DConditionModel` (or `ControlNetModel`).

Frames are folded into the batch (`b c f h w -> (b f) c h w`) so every image layer runs per frame,
as in the official 3D UNet. :class:`MotionUNet`'s forward walks the 2D model's blocks itself and
runs a motion module where the official UNet3D calls one: after each resnet (+ attention) of the
down and up blocks and, for v2, between the mid block's attention and its second resnet. The 2D
model's weights, module tree and state dict are never touched, and everything that varies per
call (frame count, motion scale, frame windows) is an argument of `forward`, so the model can be
called re-entrantly and traced as one graph. Its cross-attention processors are wrapped (undone
by `remove()`) so that text shared by a video's frames is projected once per video, not once per
frame (:class:`SharedTextAttention`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.utils.checkpoint
from diffusers import UNet2DConditionModel
from torch import nn

from ..errors import UsageError
from .config import MotionModuleConfig
from .frames import (
    WindowAccumulator,
    fold_frames,
    per_frame_inputs,
    select_frames,
    unfold_frames,
)
from .module import MotionModules, TemporalModule

# A window of frames and its per-frame fusion weights (`views`: only the motion modules see it).
FrameWindow = tuple[Sequence[int], torch.Tensor]


@dataclass(frozen=True)
class MotionCall:
    """What one forward call needs below the top: the per-call state, passed down explicitly."""

    num_frames: int
    scale: float | torch.Tensor = 1.0  # a float, a 0-d tensor, or one value per frame (f,)
    windows: tuple[FrameWindow, ...] | None = None
    checkpoint: bool = False  # recompute motion modules in backward (training)
    chunks: int = 1  # pieces the motion modules split their positions into (memory)


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
        self.gradient_checkpointing = False  # a training setting, not per call
        self.ff_chunk_rows: int | None = None  # see set_ff_chunking
        self._check_layout()
        self._modules_per_block = _motion_sites(motion)
        self._cross = [m for m in unet.modules() if getattr(m, "is_cross_attention", False)]
        share_text_attention(unet)

    @property
    def config(self) -> MotionModuleConfig:
        return self.motion.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    def _check_layout(self) -> None:
        problems = layout_problems(self.unet, self.motion)
        if problems:
            raise UsageError(
                "motion module does not fit this UNet (is it for another base model, e.g. SDXL?): "
                + "; ".join(problems)
            )

    def remove(self) -> UNet2DConditionModel:
        """The 2D UNet, exactly as it was (its cross-attention processors unwrapped)."""
        share_text_attention(self.unet, False)
        return self.unet

    def shares_text(self) -> bool:
        """Whether text can stay one row per video: every cross-attention processor takes it."""
        return self.unet.encoder_hid_proj is None and all(
            isinstance(m.processor, SharedTextAttention) for m in self._cross
        )

    def set_ff_chunking(self, rows: int | None) -> None:
        """Run every feed-forward layer in pieces of `rows` images of the folded batch (frames
        x videos; None: whole). The image layers' transformer blocks chunk along that batch
        (diffusers' `set_chunk_feed_forward`, so calls must have a multiple of `rows` images);
        the motion modules run their transformer blocks on their positions in as many pieces.
        Exact: a smaller peak of activations, the same result."""
        if rows is not None and rows < 1:
            raise ValueError(f"ff chunk rows must be >= 1, got {rows}")
        set_ff_chunking(self.unet, rows)
        self.ff_chunk_rows = rows

    def call(self, num_frames: int, motion_scale=1.0, windows=None, rows: int = 0) -> MotionCall:
        """The per-call state for `num_frames` frames (`rows`: images in the folded batch)."""
        chunk = self.ff_chunk_rows
        if chunk and rows % chunk:
            raise ValueError(
                f"feed-forward chunks of {chunk} images do not divide a batch of {rows} "
                "(set_ff_chunking)"
            )
        return MotionCall(
            num_frames,
            as_motion_scale(motion_scale),
            None if windows is None else tuple(windows),
            self.gradient_checkpointing and torch.is_grad_enabled(),
            rows // chunk if chunk else 1,
        )

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor,
        *,
        motion_scale: float | torch.Tensor | Sequence[float] = 1.0,
        windows: Sequence[FrameWindow] | None = None,
        down_block_additional_residuals: Sequence[torch.Tensor] | None = None,
        mid_block_additional_residual: torch.Tensor | None = None,
        added_cond_kwargs: dict | None = None,
        cross_attention_kwargs: dict | None = None,
        deep_feature: torch.Tensor | None = None,
        return_deep_feature: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """sample (b, c, f, h, w) -> noise prediction (b, c_out, f, h, w).

        motion_scale: scales the motion modules' contribution (a number, or one per frame).
        windows: run each motion module on these frame windows and fuse per frame ("views").
        ControlNet residuals (frames folded) are added as in diffusers; `added_cond_kwargs`
        (e.g. IP-Adapter image embeddings) and `cross_attention_kwargs` go to the 2D layers.
        Feature caching (DeepCache, Ma et al. 2024): `return_deep_feature=True` also returns
        the input of the last up block; given back as `deep_feature` at a later step, only the
        first down block and the last up block run (an approximation).
        """
        b, _, f, _, _ = sample.shape
        call = self.call(f, motion_scale, windows, b * f)
        shared = self.shares_text()
        t, text = per_frame_inputs(timestep, encoder_hidden_states, b, f, sample.device, shared)
        unet = self.unet
        x = fold_frames(sample)
        emb = time_embedding(unet, x, t)
        if unet.encoder_hid_proj is not None:  # e.g. IP-Adapter: (text, image tokens)
            text = unet.process_encoder_hidden_states(text, added_cond_kwargs or {})
        ctx = BlockInputs(emb, text, cross_attention_kwargs, call)
        if deep_feature is not None:
            x = self._shallow(unet.conv_in(x), deep_feature, ctx, down_block_additional_residuals)
            return unfold_frames(self._out(x, call), f)
        x, skips = self.down(unet.conv_in(x), ctx)
        if down_block_additional_residuals is not None:
            skips = [s + r for s, r in zip(skips, down_block_additional_residuals, strict=True)]
        x = self.mid(x, ctx)
        if mid_block_additional_residual is not None:
            x = x + mid_block_additional_residual
        x, feature = self.up(x, skips, ctx, keep_feature=return_deep_feature)
        out = unfold_frames(self._out(x, call), f)
        return (out, feature) if return_deep_feature else out

    def _out(self, x: torch.Tensor, call: MotionCall) -> torch.Tensor:
        unet = self.unet
        if unet.conv_norm_out is not None:
            x = unet.conv_act(self._norm(unet.conv_norm_out, x, call))
        return unet.conv_out(x)

    def _shallow(self, x, feature, ctx: BlockInputs, residuals) -> torch.Tensor:
        """DeepCache's shallow pass: the first down block's layers (no downsampler), then the
        last up block on the cached deep `feature` and those skip connections."""
        block, modules = self.unet.down_blocks[0], self._modules_per_block["down"][0]
        skips = [x]
        for resnet, attention, module in _layers(block, modules):
            x = self._layer(resnet, attention, module, x, ctx)
            skips.append(x)
        if residuals is not None:
            skips = [s + r for s, r in zip(skips, residuals)]
        return self.up(feature, skips, ctx, start=len(self.unet.up_blocks) - 1)[0]

    # -- the blocks ------------------------------------------------------------------------------
    def down(self, x: torch.Tensor, ctx: BlockInputs) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """The down blocks; returns the hidden state and every skip connection (conv_in's first)."""
        skips = [x]
        for block, modules in zip(self.unet.down_blocks, self._modules_per_block["down"]):
            for resnet, attention, module in _layers(block, modules):
                x = self._layer(resnet, attention, module, x, ctx)
                skips.append(x)
            for downsampler in block.downsamplers or []:
                x = downsampler(x)
                skips.append(x)
        return x, skips

    def mid(self, x: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        """The mid block: resnet, then (attention [+ v2's motion module], resnet) pairs."""
        block = self.unet.mid_block
        if block is None:
            return x
        modules = self._modules_per_block["mid"] or [None] * len(block.attentions)
        x = self._resnet(block.resnets[0], x, ctx)
        for attention, resnet, module in zip(block.attentions, block.resnets[1:], modules):
            x = self._attend(attention, x, ctx)
            x = self._motion(module, x, ctx.call)
            x = self._resnet(resnet, x, ctx)
        return x

    def up(
        self,
        x: torch.Tensor,
        skips: list[torch.Tensor],
        ctx: BlockInputs,
        start: int = 0,
        keep_feature: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The up blocks from `start`, consuming the skip connections from the last; returns
        the output and, with `keep_feature`, the last up block's input (DeepCache's feature).
        One frame holds the hidden state, so each intermediate is freed as soon as it is used."""
        # diffusers' rule: latents not divisible by the total upsampling get explicit sizes
        odd_size = any(s % 2**self.unet.num_upsamplers for s in skips[0].shape[-2:])
        last = len(self.unet.up_blocks) - 1
        feature = None
        for i in range(start, last + 1):
            block, modules = self.unet.up_blocks[i], self._modules_per_block["up"][i]
            feature = x if keep_feature and i == last else feature
            size = None
            if odd_size and i < last:  # the skip after this block's own
                size = skips[-1 - len(block.resnets)].shape[2:]
            for resnet, attention, module in _layers(block, modules):
                x = torch.cat([x, skips.pop()], dim=1)
                x = self._resnet(resnet, x, ctx)
                if attention is not None:
                    x = self._attend(attention, x, ctx)
                x = self._motion(module, x, ctx.call)
            for upsampler in block.upsamplers or []:
                x = upsampler(x, size)
        return x, feature

    def _layer(self, resnet, attention, module, x: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        x = self._resnet(resnet, x, ctx)
        if attention is not None:
            x = self._attend(attention, x, ctx)
        return self._motion(module, x, ctx.call)

    @staticmethod
    def _attend(attention: nn.Module, x: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        return attention(
            x,
            encoder_hidden_states=ctx.text,
            cross_attention_kwargs=ctx.cross_attention_kwargs,
            return_dict=False,
        )[0]

    def _resnet(self, resnet: nn.Module, x: torch.Tensor, ctx: BlockInputs) -> torch.Tensor:
        if not self.config.groupnorm_across_frames:
            return resnet(x, ctx.emb)
        return _resnet_video_norm(resnet, x, ctx.emb, ctx.call.num_frames)

    def _norm(self, norm: nn.GroupNorm, x: torch.Tensor, call: MotionCall) -> torch.Tensor:
        if not self.config.groupnorm_across_frames:
            return norm(x)
        return video_group_norm(norm, x, call.num_frames)

    # -- the motion modules ----------------------------------------------------------------------
    def _motion(self, module: TemporalModule | None, x: torch.Tensor, call: MotionCall):
        if module is None:
            return x
        if call.windows is not None:
            out = self._windowed(module, x, call)
        elif call.checkpoint:
            out = torch.utils.checkpoint.checkpoint(module, x, call.num_frames, use_reentrant=False)
        else:
            out = module(x, call.num_frames, call.chunks)
        return scale_motion(x, out, call.scale)

    @staticmethod
    def _windowed(module: TemporalModule, x: torch.Tensor, call: MotionCall) -> torch.Tensor:
        video = unfold_frames(x, call.num_frames)
        fused = WindowAccumulator.like(video)
        for indices, weights in call.windows:
            part = module(fold_frames(select_frames(video, indices)), len(indices), call.chunks)
            fused.add(indices, unfold_frames(part, len(indices)), weights)
        return fold_frames(fused.result().to(x.dtype))


@dataclass(frozen=True)
class BlockInputs:
    """What every block of one call needs besides the hidden state."""

    emb: torch.Tensor  # time embedding per frame
    text: torch.Tensor | tuple  # cross-attention input (a tuple with IP-Adapter tokens)
    cross_attention_kwargs: dict | None
    call: MotionCall


class SharedTextAttention:
    """A cross-attention processor wrapper for text shared by the frames of a video: hidden
    states `((b f), n, c)` with text `(b, m, d)` attend as `(b, f n, c)` (a view), so the key
    and value projections run once per video instead of once per frame; every query still
    attends to the same keys: the same result. Other shapes go to the wrapped processor as
    they are."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(
        self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
        **kwargs,
    ):  # fmt: skip
        text = encoder_hidden_states
        if isinstance(text, torch.Tensor) and hidden_states.ndim == 3 and attention_mask is None:
            rows, videos = hidden_states.shape[0], text.shape[0]
            if rows != videos and rows % videos == 0:
                n, c = hidden_states.shape[1:]
                folded = hidden_states.reshape(videos, rows // videos * n, c)
                out = self.inner(attn, folded, text, None, temb, **kwargs)
                return out.reshape(rows, n, out.shape[-1])
        return self.inner(attn, hidden_states, text, attention_mask, temb, **kwargs)


# The processors whose only inputs are hidden states and text (others, e.g. IP-Adapter's, take
# more, by keyword: they stay as they are, and text then goes per frame).
PLAIN_PROCESSORS = ("AttnProcessor2_0", "AttnProcessor", "FusedAttnProcessor2_0")


def share_text_attention(model: nn.Module, share: bool = True) -> None:
    """Wrap (or unwrap) every plain cross-attention processor of `model` in
    SharedTextAttention."""
    for module in model.modules():
        if not getattr(module, "is_cross_attention", False):
            continue
        processor = module.processor
        if share and type(processor).__name__ in PLAIN_PROCESSORS:
            module.set_processor(SharedTextAttention(processor))
        elif not share and isinstance(processor, SharedTextAttention):
            module.set_processor(processor.inner)


def _layers(block: nn.Module, modules: list):
    """(resnet, attention or None, motion module or None) for each layer of a block."""
    attentions = getattr(block, "attentions", None) or [None] * len(block.resnets)
    return zip(block.resnets, attentions, modules)


def set_ff_chunking(model: nn.Module, rows: int | None) -> None:
    """diffusers' feed-forward chunking (along the folded batch) on every transformer block of
    `model` that has it; None turns it off."""
    for module in model.modules():
        if hasattr(module, "set_chunk_feed_forward") and hasattr(module, "ff"):
            module.set_chunk_feed_forward(rows, 0)


def scale_motion(x: torch.Tensor, out: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """The motion module's contribution (`out - x`) scaled; a scale of exactly 1 returns `out`."""
    if isinstance(scale, float) and scale == 1.0:
        return out
    if isinstance(scale, torch.Tensor) and scale.ndim == 1:  # per frame, frames folded
        scale = scale.to(x).repeat(x.shape[0] // scale.shape[0]).view(-1, 1, 1, 1)
    return x + (out - x) * scale


def as_motion_scale(scale: float | torch.Tensor | Sequence[float]) -> float | torch.Tensor:
    """A float, or a tensor (0-d, or one value per frame)."""
    if isinstance(scale, torch.Tensor):
        return scale
    if isinstance(scale, int | float):
        return float(scale)
    return torch.tensor(list(scale), dtype=torch.float32)


def time_embedding(host: nn.Module, x: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
    """The host's time embedding per row of `x` (SD1.5: no class or additional embeddings)."""
    t = timestep if timestep.ndim else timestep[None]
    t_emb = host.time_proj(t.to(x.device).expand(x.shape[0])).to(dtype=x.dtype)
    emb = host.time_embedding(t_emb, None)
    if getattr(host, "time_embed_act", None) is not None:
        emb = host.time_embed_act(emb)
    return emb


def video_group_norm(norm: nn.GroupNorm, x: torch.Tensor, num_frames: int) -> torch.Tensor:
    """GroupNorm with statistics over all frames of each video (v1's UNet3D), frames folded."""
    return fold_frames(norm(unfold_frames(x, num_frames).contiguous()))


def _resnet_video_norm(resnet, x: torch.Tensor, emb: torch.Tensor, num_frames: int):
    """diffusers' `ResnetBlock2D.forward` (SD1.5's: no up/down sampling, default time-embedding
    norm) with both GroupNorms over all frames, as v1's UNet3D computes it."""
    h = resnet.nonlinearity(video_group_norm(resnet.norm1, x, num_frames))
    h = resnet.conv1(h)
    temb = resnet.time_emb_proj(resnet.nonlinearity(emb))[:, :, None, None]
    h = resnet.nonlinearity(video_group_norm(resnet.norm2, h + temb, num_frames))
    h = resnet.conv2(resnet.dropout(h))
    if resnet.conv_shortcut is not None:
        x = resnet.conv_shortcut(x)
    return (x + h) / resnet.output_scale_factor


def _motion_sites(motion: MotionModules) -> dict[str, list]:
    """The motion modules of each down / mid / up block, in execution order."""
    return {
        "down": [list(b.motion_modules) for b in motion.down_blocks],
        "mid": list(motion.mid_block.motion_modules) if motion.mid_block is not None else None,
        "up": [list(b.motion_modules) for b in motion.up_blocks],
    }


def layout_problems(host: nn.Module, motion: MotionModules) -> list[str]:
    """Why `motion` does not fit `host` (a UNet, or a ControlNet with no up blocks); [] if it
    fits."""
    cfg, problems = motion.config, []
    if tuple(host.config.block_out_channels) != cfg.block_out_channels:
        problems.append(
            f"UNet block_out_channels {tuple(host.config.block_out_channels)} != "
            f"motion module {cfg.block_out_channels}"
        )
    up_blocks = list(getattr(host, "up_blocks", None) or [])
    if len(motion.up_blocks) not in (0, len(up_blocks)):
        problems.append("the motion module has up-block modules but the model has no up blocks")
    for name, blocks, motion_blocks in (
        ("down", host.down_blocks, motion.down_blocks),
        ("up", up_blocks, motion.up_blocks),
    ):
        for i, (block, mb) in enumerate(zip(blocks, motion_blocks)):
            if len(block.resnets) != len(mb.motion_modules):
                problems.append(
                    f"{name}_blocks.{i}: {len(block.resnets)} resnets but "
                    f"{len(mb.motion_modules)} motion modules"
                )
    for attr in ("class_embedding", "add_embedding"):
        if getattr(host, attr, None) is not None:
            problems.append(f"the model has a {attr} (not an SD1.5-style UNet)")
    return problems
