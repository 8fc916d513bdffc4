"""One GPU benchmark: this project's pipeline against diffusers' `AnimateDiffPipeline` on
SD1.5-shaped random weights built on the device from a seed, each variant in its own process.

    PYTHONPATH=src python benchmarks/bench_gpu.py                      # H100/H200: <= 8 min (--budget)
    PYTHONPATH=src python benchmarks/bench_gpu.py --device cpu --arch mini --frames 4 \\
        --size 64 --steps 2 --window-frames 8 --window-length 4 --repeats 1 --compile none

Needs only torch, transformers, accelerate, safetensors (and diffusers and this project as
wheels or source). Variants: `diffusers` (AnimateDiffPipeline, eager), `eager` (ours, defaults),
`optimised` (ours: one compiled graph per UNet call, CUDA graphs, fused q/k/v), `windowed`
(optimised, `--window-frames` frames in context windows), then each switch alone on top of
`eager` (`fused-qkv`, `channels-last`, `regional`, `full-compile`, `deepcache`,
`guidance-subset`) while the time budget lasts. Per variant: one warm-up generation (compile
and graph capture included; reported apart), then `--repeats` timed ones (medians): seconds per
generation and per step, phases (text, denoise, VAE), model FLOP utilisation against 989
TFLOP/s (H100/H200 dense bf16) and against a bf16 matmul measured on this device, peak memory
allocated and reserved (weights included), the ratio to diffusers, and the largest and mean
difference of each video from `eager`'s. Writes `bench_gpu.json` and `bench_gpu.md`.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import sd15
import torch
from common import gpu_line, load_average, machine_info, peak_rss_mib, quiet, reset_peak_rss
from torch.utils.flop_counter import FlopCounterMode

MARK = "BENCH_GPU "
PEAK_TFLOPS = 989.0  # H100/H200 SXM dense bf16 (no sparsity)
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SCHEDULE = dict(
    beta_schedule="linear", beta_start=0.00085, beta_end=0.012, steps_offset=1, clip_sample=False
)
# What each variant changes on top of this project's defaults (load-time, call-time).
OURS = {
    "eager": ({}, {}),
    "optimised": ({"compile": "full", "cuda_graphs": True, "fuse_qkv": True}, {}),
    "windowed": ({"compile": "full", "cuda_graphs": True, "fuse_qkv": True}, {"windowed": True}),
    "fused-qkv": ({"fuse_qkv": True}, {}),
    "channels-last": ({"channels_last": True}, {}),
    "regional": ({"compile": "regional"}, {}),
    "full-compile": ({"compile": "full"}, {}),
    "deepcache": ({}, {"deepcache_interval": 3}),
    "guidance-subset": ({}, {"guidance_end": 0.6}),
}
DEFAULT_VARIANTS = ["diffusers", "eager", "optimised", "windowed", "fused-qkv", "channels-last",
                    "regional", "deepcache", "guidance-subset"]  # fmt: skip


# -- arguments ---------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--arch", choices=["sd15", "mini"], default="sd15", help="mini: CPU checks")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--size", type=int, default=512, help="height = width in pixels")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed generations after the warm-up")
    p.add_argument("--window-frames", type=int, default=128, help="frames of `windowed`")
    p.add_argument("--window-length", type=int, default=16, help="its context_length")
    p.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    p.add_argument("--compile", choices=["full", "regional", "none"], default="full",
                   help="the compilation of `optimised` and `windowed`")  # fmt: skip
    p.add_argument("--budget", type=float, default=450, help="seconds; later variants skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU checks)")
    p.add_argument("--out", default="benchmarks/results", help="folder for the JSON and table")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    return p.parse_args(argv)


# -- models ------------------------------------------------------------------------------------
def ours_pipeline(which: str, image, motion, args):
    load = OURS[which][0]
    if which in ("optimised", "windowed"):
        load = {**load, "compile": args.compile}
    pipe = sd15.ours(image, motion)
    pipe.optimize(
        load.get("compile", "none"),
        cuda_graphs=load.get("cuda_graphs", False),
        fuse_qkv=load.get("fuse_qkv", False),
        channels_last=load.get("channels_last", False),
    )
    return pipe


def diffusers_pipeline(image, motion, device: str):
    from diffusers import AnimateDiffPipeline, DDIMScheduler, MotionAdapter

    from animatediff.checkpoints.motion import diffusers_adapter_config, to_diffusers_layout

    config = diffusers_adapter_config(motion.config)
    with torch.device(device):
        adapter = MotionAdapter.from_config({k: v for k, v in config.items() if k[0] != "_"})
        adapter.load_state_dict(to_diffusers_layout(motion.state_dict(), motion.config))
        pipe = AnimateDiffPipeline(
            vae=image.vae,
            text_encoder=image.text_encoder,
            tokenizer=image.tokenizer,
            unet=image.unet,
            motion_adapter=adapter.to(image.unet.dtype),
            scheduler=DDIMScheduler(**SCHEDULE),
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device=device, dtype=image.unet.dtype)  # UNetMotionModel starts in fp32


# -- timing ------------------------------------------------------------------------------------
class Clock:
    """Phase timings without synchronising inside the generation: CUDA events on a GPU, host
    timestamps elsewhere; read after the generation has finished."""

    def __init__(self, cuda: bool):
        self.cuda, self.marks = cuda, []

    def mark(self, name: str) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append((name, event))
        else:
            self.marks.append((name, time.perf_counter()))

    def wrap(self, obj, method: str, phase: str) -> None:
        original = getattr(obj, method)

        def timed(*a, **kw):
            self.mark(f"{phase}+")
            out = original(*a, **kw)
            self.mark(f"{phase}-")
            return out

        setattr(obj, method, timed)

    def phases(self) -> dict[str, float]:
        """Seconds per phase (summed over its calls) and in total."""
        if self.cuda:
            torch.cuda.synchronize()
        first, out, opened = self.marks[0][1], {}, {}
        for name, mark in self.marks:
            key, edge = name[:-1], name[-1]
            if edge == "+":
                opened[key] = mark
            else:
                out[key] = out.get(key, 0.0) + _seconds(opened.pop(key), mark, self.cuda)
        out["total"] = _seconds(first, self.marks[-1][1], self.cuda)
        return out


def _seconds(a, b, cuda: bool) -> float:
    return a.elapsed_time(b) / 1000 if cuda else b - a


def generator(which: str, pipe, clock: Clock, args, latents, settings: dict):
    """A function that makes one video (b, 3, f, h, w) in [0, 1], its phases on `clock`."""
    common = dict(
        negative_prompt="worst quality, low quality",
        num_frames=latents.shape[2],
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )
    prompt = "a boy playing guitar, best quality"
    if which == "diffusers":
        clock.wrap(pipe, "encode_prompt", "text")
        clock.wrap(pipe, "decode_latents", "vae")
        dtype = pipe.unet.dtype

        def run():
            out = pipe(prompt=prompt, latents=latents.to(pipe.device, dtype), output_type="pt",
                       **common)  # fmt: skip
            return out.frames.permute(0, 2, 1, 3, 4)

        return run
    clock.wrap(pipe, "plan", "text")
    clock.wrap(pipe, "sample", "denoise")
    clock.wrap(pipe, "decode", "vae")
    extra = {k: v for k, v in settings.items() if k != "windowed"}
    if settings.get("windowed"):
        extra.update(context_length=args.window_length, context_overlap=args.window_length // 4)
    return lambda: pipe(prompt, latents=latents, progress=False, **common, **extra).frames


# -- one variant in this process -----------------------------------------------------------------
def run_variant(which: str, args) -> dict:
    quiet()
    device, cuda = args.device, torch.device(args.device).type == "cuda"
    t0 = time.perf_counter()
    image, motion = sd15.build(device, DTYPES[args.dtype], seed=args.seed, arch=args.arch)
    settings = OURS.get(which, ({}, {}))[1]
    factor = 2 ** (len(image.vae.config.block_out_channels) - 1)
    if which == "diffusers":
        pipe = diffusers_pipeline(image, motion, device)
        image = motion = None  # it copied the UNet and the motion modules: free ours
    else:
        pipe = ours_pipeline(which, image, motion, args)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    frames = args.window_frames if settings.get("windowed") else args.frames
    shape = (1, 4, frames, args.size // factor, args.size // factor)
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(args.seed))
    _sync(cuda)
    build_s = time.perf_counter() - t0
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    else:
        reset_peak_rss()
    runs, video = [], None
    for i in range(1 + args.repeats):
        clock = Clock(cuda)
        make = generator(which, pipe, clock, args, latents, settings)
        cpu0 = time.process_time()
        clock.mark("all+")
        with torch.no_grad():
            video = make()
        clock.mark("all-")
        phases = clock.phases()
        phases["cpu"] = time.process_time() - cpu0
        runs.append(phases)
        if i == 0 and cuda:  # the warm-up's peak (compilation, graph capture) apart
            warm_alloc, warm_reserved = _cuda_peaks()
            torch.cuda.reset_peak_memory_stats()
        _unwrap(pipe)
    memory = dict(zip(("allocated_gib", "reserved_gib"), _cuda_peaks())) if cuda else {}
    if cuda:
        memory.update(warmup_allocated_gib=warm_alloc, warmup_reserved_gib=warm_reserved)
    else:
        memory["peak_rss_gib"] = peak_rss_mib() / 1024
    path = Path(args.spec).parent / f"{which}.pt"
    torch.save(video.float().cpu().contiguous(), path)
    return dict(which=which, frames=frames, build_s=build_s, warmup=runs[0], runs=runs[1:],
                memory=memory, video=str(path))  # fmt: skip


def _unwrap(pipe) -> None:
    for name in ("plan", "sample", "decode", "encode_prompt", "decode_latents"):
        pipe.__dict__.pop(name, None)


def _cuda_peaks() -> tuple[float, float]:
    return torch.cuda.max_memory_allocated() / 2**30, torch.cuda.max_memory_reserved() / 2**30


def _sync(cuda: bool) -> None:
    if cuda:
        torch.cuda.synchronize()


def matmul_tflops(args) -> dict:
    """The bf16 (CPU: fp32) matmul rate this device reaches: the practical peak."""
    cuda = torch.device(args.device).type == "cuda"
    n, dtype = (8192, torch.bfloat16) if cuda else (1024, torch.float32)
    a, b = (torch.randn(n, n, device=args.device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    _sync(cuda)
    reps, t0 = 20 if cuda else 3, time.perf_counter()
    for _ in range(reps):
        a @ b
    _sync(cuda)
    seconds = (time.perf_counter() - t0) / reps
    return dict(n=n, dtype=str(dtype), tflops=2 * n**3 / seconds / 1e12)


# -- FLOPs -------------------------------------------------------------------------------------
def generation_flops(args, frames: int, windows: int) -> dict:
    """FLOPs of one generation counted on the meta device: UNet calls (guidance batched) per
    step, times the steps (and windows), plus the VAE decoding every frame."""
    image, motion = sd15.build("meta", DTYPES[args.dtype], arch=args.arch)
    pipe = sd15.ours(image, motion)
    factor = 2 ** (len(image.vae.config.block_out_channels) - 1)
    h = args.size // factor
    rows = 2 if args.guidance > 1 else 1
    length = min(frames, args.window_length) if windows > 1 else frames
    x = torch.zeros(rows, 4, length, h, h, device="meta", dtype=DTYPES[args.dtype])
    text = torch.zeros(rows, 77, image.text_encoder.config.hidden_size, device="meta",
                       dtype=x.dtype)  # fmt: skip
    with torch.no_grad(), FlopCounterMode(display=False) as unet_count:
        pipe.unet(x, torch.tensor(500, device="meta"), text)
    with torch.no_grad(), FlopCounterMode(display=False) as vae_count:
        image.vae.decode(torch.zeros(1, 4, h, h, device="meta", dtype=x.dtype))
    unet = unet_count.get_total_flops() * args.steps * windows
    vae = vae_count.get_total_flops() * frames
    return dict(unet=unet, vae=vae, total=unet + vae)


# -- the driver ----------------------------------------------------------------------------------
def run_worker(which: str, spec: Path, args, budget_left: float) -> dict | None:
    cmd = [sys.executable, str(Path(__file__).resolve()), *args.argv, "--worker", which,
           "--spec", str(spec)]  # fmt: skip
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(budget_left, 30))
    except subprocess.TimeoutExpired:
        return dict(which=which, error="stopped: over the time budget")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(MARK)]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-3:]
        return dict(which=which, error=f"exit {proc.returncode}: {' | '.join(tail)}")
    return json.loads(lines[-1][len(MARK) :])


def windows_of(args) -> int:
    from animatediff.options import ContextOptions
    from animatediff.pipeline.context import context_windows

    ctx = ContextOptions(context_length=args.window_length, context_overlap=args.window_length // 4)
    return len(context_windows(args.window_frames, 0, args.steps, ctx))


def summarise(result: dict, flops: dict, matmul: dict, args) -> dict:
    runs = result["runs"]
    med = {k: statistics.median(r.get(k, 0.0) for r in runs) for k in runs[0]}
    total = med["total"]
    return dict(
        seconds=total,
        min=min(r["total"] for r in runs),
        max=max(r["total"] for r in runs),
        step=med.get("denoise", total - med.get("text", 0) - med.get("vae", 0)) / args.steps,
        text=med.get("text", 0.0),
        denoise=med.get("denoise", total - med.get("text", 0) - med.get("vae", 0)),
        vae=med.get("vae", 0.0),
        cpu=med["cpu"],
        warmup=result["warmup"]["total"],
        compile=result["warmup"]["total"] - total,
        tflops=flops["total"] / total / 1e12,
        mfu=flops["total"] / total / 1e12 / PEAK_TFLOPS,
        mfu_measured=flops["total"] / total / 1e12 / matmul["tflops"],
        memory=result["memory"],
    )


def compare_videos(a: str, b: str) -> dict:
    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    if x.shape != y.shape:
        return {}
    d = (x - y).abs()
    return dict(max=d.max().item(), mean=d.mean().item())


def table(rows: list[dict], cuda: bool) -> str:
    mem = ["peak alloc GiB", "peak reserved GiB"] if cuda else ["peak RSS GiB", ""]
    head = ["variant", "frames", "s/gen", "min..max", "s/step", "text s", "denoise s", "VAE s",
            "warm-up s", "compile s", "TFLOP/s", "MFU (989)", "MFU (matmul)", *mem,
            "vs diffusers", "diff vs eager (max / mean)"]  # fmt: skip
    lines = [
        "| " + " | ".join(h for h in head if h) + " |",
        "|" + "---|" * len([h for h in head if h]),
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['which']} | {r['error']} |")
            continue
        s, m = r["summary"], r["summary"]["memory"]
        mems = (
            [m.get("allocated_gib", 0), m.get("reserved_gib", 0)] if cuda else [m["peak_rss_gib"]]
        )
        diff = r.get("diff", {})
        cells = [
            r["which"], str(r["frames"]), f"{s['seconds']:.3f}", f"{s['min']:.3f}..{s['max']:.3f}",
            f"{s['step']:.4f}", f"{s['text']:.3f}", f"{s['denoise']:.3f}", f"{s['vae']:.3f}",
            f"{s['warmup']:.1f}", f"{s['compile']:.1f}", f"{s['tflops']:.3g}",
            f"{s['mfu']:.1%}", f"{s['mfu_measured']:.1%}", *(f"{v:.2f}" for v in mems),
            f"{r['ratio']:.2f}x" if r.get("ratio") else "",
            f"{diff['max']:.2e} / {diff['mean']:.2e}" if diff else "",
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = list(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.worker:
        if args.worker == "matmul":
            print(MARK + json.dumps(matmul_tflops(args)), flush=True)
            return
        print(MARK + json.dumps(run_variant(args.worker, args)), flush=True)
        return
    start = time.perf_counter()
    cuda = torch.device(args.device).type == "cuda"
    device_line = f"device: {args.device} = {gpu_line(args.device)}" if cuda else "device: cpu"
    header = machine_info(args, device_line, ("diffusers", "transformers"))
    print("\n".join(header), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_gpu_") as work:
        spec = Path(work) / "spec.json"
        spec.write_text("{}")
        matmul = run_worker("matmul", spec, args, args.budget)
        windows = windows_of(args)
        flops = {
            "clip": generation_flops(args, args.frames, 1),
            "windowed": generation_flops(args, args.window_frames, windows),
        }
        rows, slowest = [], 0.0
        for which in args.variants.split(","):
            left = args.budget - (time.perf_counter() - start)
            if left < slowest:
                rows.append(dict(which=which, error=f"skipped: {left:.0f} s of the budget left"))
                continue
            t0 = time.perf_counter()
            result = run_worker(which, spec, args, left)
            slowest = max(slowest, time.perf_counter() - t0)
            if "error" not in result:
                kind = "windowed" if which == "windowed" else "clip"
                result["summary"] = summarise(result, flops[kind], matmul, args)
            rows.append(result)
            done = result.get("error") or f"{result['summary']['seconds']:.3f} s"
            print(f"{which}: {done}", flush=True)
        _relate(rows)
        markdown = table(rows, cuda)
    report = dict(
        header=header, args={k: v for k, v in vars(args).items() if k != "argv"},
        matmul=matmul, flops=flops, windows=windows, variants=rows,
        wall_s=time.perf_counter() - start, load_average_end=load_average(),
    )  # fmt: skip
    (out / "bench_gpu.json").write_text(json.dumps(report, indent=2))
    lines = "\n".join(f"- {line}" for line in header)
    (out / "bench_gpu.md").write_text(f"{lines}\n\n{markdown}\n")
    print("\n" + markdown)
    print(
        f"\nmatmul: {matmul.get('tflops', 0):.3g} TFLOP/s ({matmul.get('dtype')}, n={matmul.get('n')})"
    )
    print(f"FLOPs per generation: clip {flops['clip']['total'] / 1e12:.1f} T, windowed "
          f"{flops['windowed']['total'] / 1e12:.1f} T ({windows} windows); wall "
          f"{report['wall_s']:.0f} s; wrote {out}/bench_gpu.json and .md")  # fmt: skip


def _relate(rows: list[dict]) -> None:
    """Ratios to diffusers (its time / ours: above 1 is faster) and differences from eager."""
    ok = {r["which"]: r for r in rows if "error" not in r}
    base, eager = ok.get("diffusers"), ok.get("eager")
    for r in ok.values():
        if base is not None and r["frames"] == base["frames"]:
            r["ratio"] = base["summary"]["seconds"] / r["summary"]["seconds"]
        if eager is not None and r is not eager:
            r["diff"] = compare_videos(eager["video"], r["video"])


if __name__ == "__main__":
    main()
