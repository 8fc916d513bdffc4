"""What each opt-in approximation buys and costs: its speed and its difference from the exact
video, on the built-in model (or any `--base` / `--motion-module`), same seed and latents.

    PYTHONPATH=src python benchmarks/bench_approx.py --threads 1
    PYTHONPATH=src python benchmarks/bench_approx.py --base path/to/sd15 \\
        --motion-module mm_sd_v15_v2.ckpt --device cuda --dtype bf16 --size 512

Rows: DeepCache (`deepcache_interval` 2, 3), guidance on a subset of steps (`guidance_end`),
tiled VAE decoding, and the VAE in bf16 / fp16 against fp32 (the exact video being the fp32
decode of the same latents). Time: process CPU time on a CPU (least disturbed by other load),
wall time with synchronisation on a GPU; the median of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from common import machine_info, quiet

from animatediff import AnimationPipeline
from animatediff.vae import decode_latents

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAMPLER = {
    "deepcache 2": dict(deepcache_interval=2),
    "deepcache 3": dict(deepcache_interval=3),
    "guidance_end 0.7": dict(guidance_end=0.7),
    "guidance_end 0.5": dict(guidance_end=0.5),
}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base")
    p.add_argument("--motion-module")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, help="height = width (default: the model's)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int)
    p.add_argument("--prompt", default="a red circle moving on a blue background")
    return p.parse_args(argv)


def timed(fn, device: str, repeats: int):
    """(median seconds, last result) after one warm-up."""
    cuda = torch.device(device).type == "cuda"
    clock = time.perf_counter if cuda else time.process_time
    out, times = fn(), []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize()
        t0 = clock()
        out = fn()
        if cuda:
            torch.cuda.synchronize()
        times.append(clock() - t0)
    return statistics.median(times), out


def difference(a: torch.Tensor, b: torch.Tensor) -> dict:
    d = (a - b).abs()
    mse = (d**2).mean().item()
    psnr = float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1 / mse)).item()
    return dict(max=d.max().item(), mean=d.mean().item(), psnr=psnr)


def main(argv=None) -> None:
    args = parse_args(argv)
    args.argv = sys.argv[1:] if argv is None else list(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    print("\n".join(machine_info(args, f"device: {args.device}", ("diffusers",))))
    pipe = AnimationPipeline.load(
        base=args.base, motion_module=args.motion_module, device=args.device,
        dtype=DTYPES[args.dtype],
    )  # fmt: skip
    size = args.size or pipe.default_size
    common = dict(num_frames=args.frames, width=size, height=size, num_inference_steps=args.steps,
                  seed=0, progress=False, output_type="latents")  # fmt: skip
    exact_s, latents = timed(lambda: pipe(args.prompt, **common), args.device, args.repeats)
    exact = decode_latents(pipe.vae, latents)
    rows = [("exact", exact_s, 1.0, difference(exact, exact))]
    for name, settings in SAMPLER.items():
        seconds, z = timed(lambda s=settings: pipe(args.prompt, **common, **s), args.device,
                           args.repeats)  # fmt: skip
        rows.append(
            (name, seconds, exact_s / seconds, difference(decode_latents(pipe.vae, z), exact))
        )
    rows += vae_rows(pipe, latents, exact, args)
    print(f"\n{args.frames} frames {size}x{size}, {args.steps} steps, {args.dtype}\n")
    print(
        "| setting | s (denoising; VAE rows: decoding) | speed-up | max abs | mean abs | PSNR dB |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds, speed, d in rows:
        print(f"| {name} | {seconds:.3f} | {speed:.2f}x | {d['max']:.2e} | {d['mean']:.2e} | "
              f"{d['psnr']:.1f} |")  # fmt: skip


def vae_rows(pipe, latents: torch.Tensor, exact: torch.Tensor, args) -> list:
    """The VAE tiled, and in bf16 / fp16, against the fp32 decode (`exact`)."""
    vae, rows = pipe.vae, []
    dtype = vae.dtype
    vae.float()
    full_s, full = timed(lambda: decode_latents(vae, latents), args.device, args.repeats)
    rows.append(("VAE fp32 (reference)", full_s, 1.0, difference(full, exact)))
    tile = vae.tile_latent_min_size, vae.tile_sample_min_size
    # tiles 3/4 of the frame wide (a multiple of 4 latents, so that diffusers' overlaps of a
    # quarter tile add up to the frame exactly, as SD1.5's 64-latent tiles do)
    vae.tile_latent_min_size = latents.shape[-1] * 3 // 4 // 4 * 4
    vae.tile_sample_min_size = vae.tile_latent_min_size * pipe.vae_scale_factor
    seconds, tiled = timed(lambda: decode_latents(vae, latents, tiling="on"), args.device,
                           args.repeats)  # fmt: skip
    rows.append(("VAE tiled (tiles 3/4 of the frame)", seconds, full_s / seconds,
                 difference(tiled, full)))  # fmt: skip
    vae.tile_latent_min_size, vae.tile_sample_min_size = tile
    for half in (torch.bfloat16, torch.float16):
        vae.to(half)
        seconds, out = timed(lambda: decode_latents(vae, latents), args.device, args.repeats)
        rows.append((f"VAE {str(half)[6:]}", seconds, full_s / seconds, difference(out, full)))
    vae.to(dtype)
    return rows


if __name__ == "__main__":
    main()
