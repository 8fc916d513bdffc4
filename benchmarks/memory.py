"""Peak accelerator memory of a generation, estimated on the meta device: no weights, no GPU.

SD1.5-shaped models are built on the meta device and this project's pipeline runs on them as it
would on a GPU (the same code: prompt encoding, the denoising loop with its feed-forward chunks
and context windows, the VAE in chunks); a dispatch mode tracks every tensor's storage while it
lives and records the largest total. Attention is counted as a fused kernel does it (output and
log-sum-exp; the meta device would otherwise take the math path and materialise the attention
matrix). Weights are added per phase by where the offload mode keeps them. What this leaves
out: the caching allocator's rounding and fragmentation (its "reserved" memory, typically
10-20% above), and the CUDA context (~0.3-0.5 GiB, not in any PyTorch figure).

    PYTHONPATH=src python benchmarks/memory.py --frames 16 --size 512 --dtype fp16
    PYTHONPATH=src python benchmarks/memory.py --frames 128 --size 512 --dtype fp16
    PYTHONPATH=src python benchmarks/memory.py --frames 16 --height 576 --width 1024 --offload model
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math

import torch
import torch.nn.functional as F
from sd15 import build, ours, weight_bytes
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from animatediff.vae import decode_chunk, frames_per_call, uses_tiles

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
GIB = 2**30


class PeakMemory(TorchDispatchMode):
    """The largest total size of live tensor storages created inside the mode."""

    def __init__(self):
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {_key(t) for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            # a view or in-place result shares an input's storage: nothing new (weights too)
            if isinstance(t, torch.Tensor) and _key(t) not in inputs:
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        self.peak = max(self.peak, self.current)
        return out

    @property
    def current(self) -> int:
        return sum(n for _, n in self.live.values())


def _key(t: torch.Tensor) -> int:
    return StorageWeakRef(t.untyped_storage()).cdata


def fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
    """What a fused attention kernel allocates: the output and its log-sum-exp (fp32)."""
    torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
    return q.new_empty((*q.shape[:-1], v.shape[-1]))


@contextlib.contextmanager
def fused_sdpa():
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def estimate(args: argparse.Namespace) -> dict:
    """Peak bytes per phase and overall, for `args` (frames, height, width, dtype, ...)."""
    dtype = DTYPES[args.dtype]
    image, motion = build("meta", dtype, version=args.version)
    pipe = ours(image, motion)
    weights = {
        "text": weight_bytes(pipe.text_encoder),
        "vae": weight_bytes(pipe.vae),
        "unet": weight_bytes(pipe.unet),
    }
    factor = pipe.vae_scale_factor
    shape = (1, 4, args.frames, args.height // factor, args.width // factor)
    latents = torch.zeros(shape)
    settings = dict(
        num_frames=args.frames,
        height=args.height,
        width=args.width,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
        context_length=args.context_length,
        ff_chunks=args.ff_chunks,
        progress=False,
    )
    with torch.no_grad(), fused_sdpa():
        tracker = PeakMemory()
        with tracker:
            denoised = pipe(
                "a boy playing guitar", latents=latents, output_type="latents", **settings
            )
        denoise_peak = tracker.peak
        decode_peak, per_call, tiled = _decode_peak(pipe, denoised, args)
    resident = _resident(weights, args.offload)
    phases = {
        "denoise": resident["unet"] + denoise_peak,
        "decode": resident["vae"] + decode_peak,
    }
    return dict(
        settings=vars(args),
        weights_gib={k: v / GIB for k, v in weights.items()},
        activations_gib={"denoise": denoise_peak / GIB, "decode": decode_peak / GIB},
        vae_frames_per_call=per_call,
        vae_tiled=tiled,
        peak_gib={k: v / GIB for k, v in phases.items()},
        total_peak_gib=max(phases.values()) / GIB,
    )


def _decode_peak(pipe, latents: torch.Tensor, args) -> tuple[int, int, bool]:
    """The VAE's peak: the latents kept, one call of as many frames as `decode_latents` takes."""
    vae = pipe.vae
    h, w = latents.shape[-2:]
    tiled = uses_tiles(vae, h, w, args.vae_tiling)
    size = (vae.tile_sample_min_size,) * 2 if tiled else (args.height, args.width)
    per_call = min(16, frames_per_call(vae, *size))
    z = latents.transpose(1, 2).flatten(0, 1)[:per_call].contiguous()
    tracker = PeakMemory()
    with tracker:
        decode_chunk(vae, z, tiled)
    kept = latents.numel() * latents.element_size()
    return kept + tracker.peak, per_call, tiled


def _resident(weights: dict, offload: str) -> dict:
    """Weights on the device during each phase."""
    total = sum(weights.values())
    if offload == "none":
        return {"unet": total, "vae": total}
    if offload == "model":
        return {"unet": weights["unet"], "vae": weights["vae"]}
    return {"unet": 0, "vae": weights["vae"]}  # sequential: one layer at a time (~0)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="height = width")
    p.add_argument("--height", type=int)
    p.add_argument("--width", type=int)
    p.add_argument("--steps", type=int, default=2, help="steps run (the peak repeats each step)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--offload", choices=["none", "model", "sequential"], default="none")
    p.add_argument("--context-length", type=int, default=16)
    p.add_argument("--ff-chunks", type=int, default=0)
    p.add_argument("--vae-tiling", choices=["auto", "on", "off"], default="auto")
    p.add_argument("--version", choices=["v1", "v2", "v3"], default="v2")
    p.add_argument("--json", action="store_true", help="print JSON only")
    args = p.parse_args(argv)
    args.height = args.height or args.size
    args.width = args.width or args.size
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    result = estimate(args)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    w, a, peak = result["weights_gib"], result["activations_gib"], result["peak_gib"]
    print(
        f"{args.frames} frames {args.width}x{args.height} {args.dtype}, guidance {args.guidance}, "
        f"offload {args.offload}, context {args.context_length}, motion module {args.version}"
    )
    print("weights GiB: " + ", ".join(f"{k} {v:.2f}" for k, v in w.items()))
    print(
        f"activations GiB: denoise {a['denoise']:.2f}, decode {a['decode']:.2f} "
        f"({result['vae_frames_per_call']} frame(s) per VAE call, tiled {result['vae_tiled']})"
    )
    print(
        f"peak GiB: denoise {peak['denoise']:.2f}, decode {peak['decode']:.2f}; "
        f"total {result['total_peak_gib']:.2f} GiB = {result['total_peak_gib'] * GIB / 1e9:.2f} GB"
    )
    assert math.isfinite(result["total_peak_gib"])


if __name__ == "__main__":
    main()
