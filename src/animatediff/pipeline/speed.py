"""Lossless speed switches for the UNet: torch.compile (regional or one graph per call, CUDA
graphs), fused attention projections, channels-last; and the feed-forward chunk size that keeps
activations within a budget. Each gives the eager result within the dtype's rounding."""

from __future__ import annotations

import torch
from torch import nn

from ..motion.unet import MotionUNet, share_text_attention
from ..options import COMPILE_MODES

# The blocks regional compilation compiles: each class is traced once per input shape and the
# graph reused by every instance (parameters are graph inputs). The transformers, as diffusers'
# `compile_repeated_blocks` does for the UNet: resnets (many channel pairs, each its own graph)
# would multiply the compile time for little (their convolutions are cuDNN's either way).
REPEATED = ("BasicTransformerBlock", "TemporalModule")
FF_BUDGET = 256 * 2**20  # bytes of feed-forward activations per chunk (auto chunking)


def compile_unet(
    unet: MotionUNet, mode: str, cuda_graphs: bool = False, backend: str = "inductor"
) -> None:
    """`regional`: compile the repeated transformer blocks (a few graphs, one per block shape,
    shared by every instance: a short compile); `full`: one graph per UNet call
    (`fullgraph=True`), replayed as CUDA graphs when `cuda_graphs` (fixed shapes; CUDA only).
    `backend`: torch.compile's (tests trace with "eager")."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile must be one of {', '.join(COMPILE_MODES)}, not {mode!r}")
    if mode == "none":
        return
    # every block class and shape is one entry; the default limit (8) is meant for one function
    limits = torch._dynamo.config
    limits.cache_size_limit = max(limits.cache_size_limit, 64)
    options = dict(fullgraph=True, dynamic=False, backend=backend)
    if mode == "full":
        graphs = cuda_graphs and unet.device.type == "cuda"
        unet.compile(**options, mode="reduce-overhead" if graphs else None)
        return
    for module in unet.modules():
        if type(module).__name__ in REPEATED:
            module.compile(**options)


def fuse_projections(unet: MotionUNet) -> None:
    """Fused q/k/v projections: the image layers' attention (diffusers'
    `fuse_qkv_projections`; the separate weights then view the fused ones, so memory does not
    grow) and the motion modules' temporal attention."""
    image = unet.unet
    image.fuse_qkv_projections()  # sets its fused processors everywhere: share text again
    share_text_attention(image)
    with torch.no_grad():
        for module in image.modules():
            _alias_fused(module)
    unet.motion.fuse_projections()


def _alias_fused(attention: nn.Module) -> None:
    fused = getattr(attention, "to_qkv", None)
    names = ("to_q", "to_k", "to_v")
    if fused is None and getattr(attention, "to_kv", None) is not None:
        fused, names = attention.to_kv, ("to_k", "to_v")
    if fused is None:
        return
    for name, view in zip(names, fused.weight.data.chunk(len(names))):
        getattr(attention, name).weight.data = view
    if fused.bias is not None:
        for name, view in zip(names, fused.bias.data.chunk(len(names))):
            getattr(attention, name).bias.data = view


def channels_last(unet: MotionUNet) -> None:
    """The image layers' weights channels-last (convolutions then run NHWC; the motion modules
    keep whichever layout they are given)."""
    unet.unet.to(memory_format=torch.channels_last)


def ff_chunk_rows(
    rows: int, divides: int, tokens: int, width: int, itemsize: int, chunks: int = 0
) -> int | None:
    """Images per feed-forward chunk for calls of up to `rows` images of the folded batch, a
    divisor of `divides` (every call's batch is a multiple of it): `chunks` pieces when given
    (>= 1), else (0: auto) as few as keep a chunk's GEGLU activations (`tokens` per image x
    `width` x `itemsize`, twice: the projection and the gated half) within `FF_BUDGET`. None:
    no chunking (one piece)."""
    if chunks == 0:
        per_row = tokens * width * itemsize * 2
        chunks = -(-rows * per_row // FF_BUDGET)
    if chunks <= 1:
        return None
    target = max(1, rows // max(chunks, 1))
    return max(d for d in range(1, min(target, divides) + 1) if divides % d == 0)
