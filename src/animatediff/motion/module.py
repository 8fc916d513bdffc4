"""The motion module: a temporal transformer over the frame axis at every spatial position.

Module and parameter names follow the released checkpoints exactly
(`down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q`),
so a released file loads with `load_state_dict(strict=True)` once its `pos_encoder.pe` buffers
are dropped: the positional encoding is a fixed sinusoid, computed here for any frame count.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import MotionModuleConfig


@functools.lru_cache(maxsize=64)
def _sinusoid(num_frames: int, dim: int) -> torch.Tensor:
    # Exact (float64) values; cast once to the model's dtype. The released fp32 buffers differ
    # from these by at most a few ulps.
    position = torch.arange(num_frames, dtype=torch.float64).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float64) * (-math.log(10000.0) / dim))
    pe = torch.zeros(num_frames, dim, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe


def sinusoidal_encoding(num_frames: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """(num_frames, dim) encoding: sin on even channels, cos on odd ones (as released).
    Cached per device and dtype: treat the result as read-only. Under torch.compile it is
    computed in the graph (the same operations: a cache cannot be traced)."""
    if torch.compiler.is_compiling():
        return _sinusoid.__wrapped__(num_frames, dim).to(device=device, dtype=dtype)
    return _encoding(num_frames, dim, device, dtype)


@functools.lru_cache(maxsize=256)
def _encoding(num_frames: int, dim: int, device, dtype) -> torch.Tensor:
    return _sinusoid(num_frames, dim).to(device=device, dtype=dtype)


class TemporalAttention(nn.Module):
    """Self-attention across frames; the positional encoding is added to its input.

    :meth:`fuse_projections` makes `to_q`, `to_k` and `to_v` views of one (3 inner, dim)
    weight, so one matrix product computes all three; the state dict keeps the released names,
    and in-place weight updates (a merged MotionLoRA, `load_state_dict`) reach the fused weight.
    """

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim), nn.Dropout(0.0)])
        self.qkv: torch.Tensor | None = None  # the fused weight, when fused

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (batch * positions, frames, dim)."""
        n, f, _ = x.shape
        x = x + sinusoidal_encoding(f, x.shape[-1], x.device, x.dtype)
        if self.qkv is not None and not self._hooked():
            q, k, v = (self._heads(p) for p in F.linear(x, self.qkv).chunk(3, dim=-1))
        else:
            q, k, v = (self._heads(proj(x)) for proj in (self.to_q, self.to_k, self.to_v))
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(n, f, -1)
        return self.to_out[1](self.to_out[0](out))

    def _heads(self, t: torch.Tensor) -> torch.Tensor:
        n, f, inner = t.shape
        return t.view(n, f, self.heads, inner // self.heads).transpose(1, 2)

    def _hooked(self) -> bool:
        # a hooked (unmerged) LoRA on a projection must run: then the projections run alone
        return any(
            p._forward_hooks or p._forward_pre_hooks for p in (self.to_q, self.to_k, self.to_v)
        )

    @torch.no_grad()
    def fuse_projections(self, fuse: bool = True) -> None:
        """Fuse (or unfuse) the q, k, v projections into one weight; exact up to the rounding
        of a wider matrix product."""
        weights = [p.weight for p in (self.to_q, self.to_k, self.to_v)]
        if not fuse:
            for w in weights:
                w.data = w.data.clone()
            self.qkv = None
            return
        fused = torch.cat([w.data for w in weights])
        for w, view in zip(weights, fused.chunk(3)):
            w.data = view
        self.qkv = fused

    def _apply(self, fn, recurse=True):
        # moving or casting gives each weight its own storage again: fuse the new ones
        super()._apply(fn, recurse)
        if self.qkv is not None:
            self.fuse_projections()
        return self


class GEGLU(nn.Module):
    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hidden, gate = self.proj(x).chunk(2, dim=-1)
        return hidden * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.ModuleList(
            [GEGLU(dim, dim * mult), nn.Dropout(0.0), nn.Linear(dim * mult, dim)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TemporalTransformerBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dim_head: int, num_attention_blocks: int):
        super().__init__()
        self.attention_blocks = nn.ModuleList(
            TemporalAttention(dim, heads, dim_head) for _ in range(num_attention_blocks)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(num_attention_blocks))
        self.ff = FeedForward(dim)
        self.ff_norm = nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for attention, norm in zip(self.attention_blocks, self.norms):
            x = attention(norm(x)) + x
        return self.ff(self.ff_norm(x)) + x


class TemporalTransformer(nn.Module):
    def __init__(self, channels: int, config: MotionModuleConfig):
        super().__init__()
        heads = config.num_attention_heads
        dim_head = channels // heads // config.temporal_attention_dim_div
        inner = heads * dim_head
        self.norm = nn.GroupNorm(config.norm_num_groups, channels, eps=1e-6, affine=True)
        self.proj_in = nn.Linear(channels, inner)
        self.transformer_blocks = nn.ModuleList(
            TemporalTransformerBlock(inner, heads, dim_head, len(config.attention_block_types))
            for _ in range(config.num_transformer_blocks)
        )
        self.proj_out = nn.Linear(inner, channels)

    def forward(self, x: torch.Tensor, num_frames: int, chunks: int = 1) -> torch.Tensor:
        """x: ((b f), c, h, w) with frames folded into the batch; returns the same shape (and
        memory format). `chunks` > 1: the positions go through the transformer blocks in that
        many pieces (attention is across frames, every other layer per token: the same result,
        a smaller peak of activations)."""
        bf, c, h, w = x.shape
        b = bf // num_frames
        residual = x
        x = self.norm(x)  # per frame: statistics never cross frames here, in any version
        # Every layer but attention acts per token, so regroup once to (b h w, f, c) for all
        # blocks instead of around each attention as the official code does; same result.
        x = x.view(b, num_frames, c, h * w).permute(0, 3, 1, 2).reshape(b * h * w, num_frames, c)
        if chunks > 1 and x.shape[0] > 1:
            out = torch.empty_like(x)
            start = 0
            for part in x.chunk(chunks):
                out[start : start + part.shape[0]] = self._positions(part)
                start += part.shape[0]
            x = out
        else:
            x = self._positions(x)
        # The input's layout: contiguous (a channels-last-strided result reaching a GroupNorm
        # crashes its CPU backward kernel in some PyTorch versions), or channels-last when the
        # UNet runs channels-last.
        x = x.view(b, h, w, num_frames, c)
        if _channels_last(residual):  # one copy either way
            x = x.permute(0, 3, 1, 2, 4).reshape(bf, h, w, c).permute(0, 3, 1, 2)
            x = x.contiguous(memory_format=torch.channels_last)
        else:
            x = x.permute(0, 3, 4, 1, 2).reshape(bf, c, h, w).contiguous()
        return x + residual

    def _positions(self, x: torch.Tensor) -> torch.Tensor:
        """(positions, frames, c) -> the same: projection in, transformer blocks, out."""
        x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x)
        return self.proj_out(x)


class TemporalModule(nn.Module):
    """One motion module (the official `VanillaTemporalModule`)."""

    def __init__(self, channels: int, config: MotionModuleConfig):
        super().__init__()
        self.temporal_transformer = TemporalTransformer(channels, config)
        if config.zero_init:
            nn.init.zeros_(self.temporal_transformer.proj_out.weight)
            nn.init.zeros_(self.temporal_transformer.proj_out.bias)

    def forward(self, x: torch.Tensor, num_frames: int, chunks: int = 1) -> torch.Tensor:
        return self.temporal_transformer(x, num_frames, chunks)


def _channels_last(x: torch.Tensor) -> bool:
    return x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()


class MotionBlock(nn.Module):
    def __init__(self, channels: int, count: int, config: MotionModuleConfig):
        super().__init__()
        self.motion_modules = nn.ModuleList(TemporalModule(channels, config) for _ in range(count))


class MotionModules(nn.Module):
    """All motion modules of one UNet, laid out as in the released checkpoints."""

    def __init__(self, config: MotionModuleConfig):
        super().__init__()
        self.config = config
        channels = config.block_out_channels
        n = config.layers_per_block
        self.down_blocks = nn.ModuleList(MotionBlock(c, n, config) for c in channels)
        self.mid_block = MotionBlock(channels[-1], 1, config) if config.mid_block else None
        self.up_blocks = nn.ModuleList(
            MotionBlock(c, n + 1, config) for c in (reversed(channels) if config.up_blocks else ())
        )

    def named_temporal_modules(self) -> list[tuple[str, TemporalModule]]:
        return [(name, m) for name, m in self.named_modules() if isinstance(m, TemporalModule)]

    def fuse_projections(self, fuse: bool = True) -> None:
        """Fuse (or unfuse) every temporal attention's q, k, v projections (see
        :meth:`TemporalAttention.fuse_projections`)."""
        for m in self.modules():
            if isinstance(m, TemporalAttention):
                m.fuse_projections(fuse)
