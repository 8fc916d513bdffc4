"""Time a text-to-video generation: this project's `AnimationPipeline` against diffusers'
`AnimateDiffPipeline`, on the same weights, the same initial latents and the same settings, in
the same run.

    python benchmarks/bench_generate.py --model tiny --repeats 3
    python benchmarks/bench_generate.py --model sd15-random --size 64 --steps 2 --repeats 1
    python benchmarks/bench_generate.py --base path/to/sd15 --motion-module mm_sd_v15_v2.ckpt \
        --device cuda --dtype fp16

Each figure is the median over `--repeats` generations, after one warm-up generation. Seconds
per step are the denoising loop alone (first UNet call to the end of the last), divided by the
number of steps. Peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset before each
pipeline; "during generation" is the peak minus what was allocated once the pipeline was
loaded); elsewhere each pipeline runs in its own subprocess (this script with `--worker`) and the
figure is the peak RSS during generation (`ru_maxrss` after the load-time peak is reset through
`/proc/self/clear_refs`) minus the RSS just before the first generation, with the process's peak
over its whole life (loading included) beside it.

The two videos are expected to differ (about 1e-1): diffusers' motion-module GroupNorm pools its
statistics over all frames, the official AnimateDiff (and this project) normalises each frame.
The difference is printed as information, not checked.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import gpu_line, load_average, machine_info, quiet, reset_peak_rss, rss_kib

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "tests" / "data" / "official_tiny"
RESULT_MARKER = "BENCH_RESULT "
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEFAULT_SIZE = {"tiny": 128, "sd15-random": 512, "builtin": 64}


# -- arguments -------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        choices=["tiny", "sd15-random", "builtin"],
        default="tiny",
        help="tiny: tests/data/official_tiny (base + mm_v2.ckpt, 128x128); "
        "sd15-random: SD1.5-shaped UNet/VAE/CLIP and a v2 motion module with "
        "random weights; builtin: the package's own trained model (64x64) (ignored with --base)",
    )
    p.add_argument("--base", help="a diffusers SD1.5 folder (real weights); needs --motion-module")
    p.add_argument("--motion-module", help="a motion-module file for --base (any layout)")
    p.add_argument("--motion-version", choices=["v1", "v2", "v3"], help="override detection")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument(
        "--size", type=int, help="height = width in pixels (default: 128 tiny, 512 otherwise)"
    )
    p.add_argument("--steps", type=int, default=25, help="DDIM steps (default 25)")
    p.add_argument("--guidance", type=float, default=7.5)
    p.add_argument("--repeats", type=int, default=3, help="timed generations after one warm-up")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--seed", type=int, default=0, help="seed of the shared initial latents")
    p.add_argument("--prompt", default="a boy playing guitar, best quality")
    p.add_argument("--negative-prompt", default="worst quality, low quality")
    p.add_argument(
        "--isolate",
        action="store_true",
        help="on CUDA too, run each pipeline in its own subprocess",
    )
    p.add_argument(
        "--workdir", help="where to put temporary weights and videos (default: system tmp)"
    )
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    p.add_argument(
        "--compile", choices=["none", "regional", "full"], default="none", help="ours: compile"
    )
    p.add_argument("--fuse-qkv", action="store_true", help="ours: fused q/k/v projections")
    p.add_argument("--channels-last", action="store_true", help="ours: channels-last UNet")
    p.add_argument("--worker", choices=["ours", "diffusers"], help=argparse.SUPPRESS)
    p.add_argument("--spec", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if (args.base is None) != (args.motion_module is None):
        p.error("--base and --motion-module go together")
    if args.repeats < 1 or args.steps < 1 or args.frames < 1:
        p.error("--repeats, --steps and --frames must be positive")
    if args.size is None:
        args.size = DEFAULT_SIZE["sd15-random" if args.base is not None else args.model]
    if args.size % 8:
        p.error("--size must be a multiple of 8")
    return args


# -- weights -----------------------------------------------------------------------------------
def prepare(args: argparse.Namespace, work: Path) -> dict:
    """Paths of the weights both pipelines load: base folder, our motion-module file, the same
    module as a diffusers `MotionAdapter` folder; and the shared initial latents."""
    from animatediff.builtin.model import builtin_model
    from animatediff.checkpoints.motion import load_motion_module, save_motion_module

    t0 = time.perf_counter()
    if args.base is not None:
        base, motion_file = Path(args.base), Path(args.motion_module)
        motion = load_motion_module(motion_file, version=args.motion_version)
    elif args.model == "tiny":
        base, motion_file = TINY / "base", TINY / "mm_v2.ckpt"
        motion = load_motion_module(motion_file, version=args.motion_version)
    elif args.model == "builtin":
        model = builtin_model()
        base, motion_file = Path(model.base), Path(model.motion_module)
        motion = load_motion_module(motion_file, version=args.motion_version)
    else:
        base, motion_file, motion = build_sd15_random(work)
    adapter_dir = save_motion_module(motion, work / "motion_adapter", layout="diffusers")
    version = motion.config.version
    del motion
    gc.collect()

    factor = 8  # SD1.5's VAE; checked against the base's VAE config below
    vae_cfg = json.loads((base / "vae" / "config.json").read_text()) if base.is_dir() else None
    if vae_cfg is not None:
        factor = 2 ** (len(vae_cfg["block_out_channels"]) - 1)
    shape = (1, 4, args.frames, args.size // factor, args.size // factor)
    generator = torch.Generator("cpu").manual_seed(args.seed)
    latents_path = work / "latents.pt"
    torch.save(torch.randn(shape, generator=generator), latents_path)
    return dict(
        base=str(base),
        motion_module=str(motion_file),
        adapter=str(adapter_dir),
        motion_version=version,
        motion_version_override=args.motion_version,
        latents=str(latents_path),
        out=str(work),
        latent_shape=list(shape),
        prepare_s=time.perf_counter() - t0,
        compile=args.compile,
        fuse_qkv=args.fuse_qkv,
        channels_last=args.channels_last,
    )


def build_sd15_random(work: Path):
    """SD1.5's real architecture (`sd15`'s UNet, VAE, CLIP ViT-L text encoder) with random
    weights, saved as a diffusers folder, and a random v2 motion module saved in our layout."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sd15 import TEXT, UNET, VAE
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from animatediff.checkpoints.motion import save_motion_module
    from animatediff.motion import MotionModuleConfig, MotionModules

    torch.manual_seed(0)
    base = work / "sd15_random"
    shutil.copytree(TINY / "base" / "tokenizer", base / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(base / "tokenizer")
    unet = UNet2DConditionModel(**UNET)
    unet.save_pretrained(base / "unet")
    del unet
    vae = AutoencoderKL(**VAE)
    vae.save_pretrained(base / "vae")
    del vae
    text_encoder = CLIPTextModel(
        CLIPTextConfig(  # SD1.5's 49,408 ids; the tiny tokenizer's 1,514 are a subset
            **TEXT,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    text_encoder.save_pretrained(base / "text_encoder")
    del text_encoder
    motion = MotionModules(MotionModuleConfig.preset("v2"))
    with torch.no_grad():
        for _, module in motion.named_temporal_modules():
            proj = module.temporal_transformer.proj_out
            torch.nn.init.normal_(proj.weight, std=0.02)
            torch.nn.init.normal_(proj.bias, std=0.02)
    motion_file = save_motion_module(motion, work / "mm_v2_random.safetensors")
    return base, motion_file, motion


# -- one pipeline ----------------------------------------------------------------------------
def make_resident(*modules: torch.nn.Module) -> None:
    """Read every CPU weight once. Weights loaded from safetensors can stay memory-mapped and
    only enter the RSS when first used; without this a pipeline that maps its weights lazily
    would have their page-in counted as generation memory (and time in its warm-up)."""
    with torch.no_grad():
        for module in modules:
            for t in (*module.parameters(), *module.buffers()):
                if t.device.type == "cpu" and t.numel():
                    t.sum()


def load_ours(spec: dict, device: str, dtype: torch.dtype):
    from animatediff.pipeline.pipeline import AnimationPipeline

    pipe = AnimationPipeline.load(
        base=spec["base"],
        motion_module=spec["motion_module"],
        motion_version=spec["motion_version_override"],
        device=device,
        dtype=dtype,
        compile=spec["compile"],
        fuse_qkv=spec["fuse_qkv"],
        channels_last=spec["channels_last"],
    )
    return pipe, pipe.unet


def load_diffusers(spec: dict, device: str, dtype: torch.dtype):
    from diffusers import (
        AnimateDiffPipeline,
        AutoencoderKL,
        DDIMScheduler,
        MotionAdapter,
        UNet2DConditionModel,
    )
    from transformers import CLIPTextModel, CLIPTokenizer

    base = spec["base"]
    pipe = AnimateDiffPipeline(
        vae=AutoencoderKL.from_pretrained(base, subfolder="vae"),
        text_encoder=CLIPTextModel.from_pretrained(base, subfolder="text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(base, subfolder="tokenizer"),
        unet=UNet2DConditionModel.from_pretrained(base, subfolder="unet"),
        motion_adapter=MotionAdapter.from_pretrained(spec["adapter"]),
        scheduler=DDIMScheduler(
            beta_schedule="linear",
            beta_start=0.00085,
            beta_end=0.012,
            steps_offset=1,
            clip_sample=False,
        ),
        feature_extractor=None,
    )
    pipe.set_progress_bar_config(disable=True)
    pipe.to(device=device, dtype=dtype)
    return pipe, pipe.unet


def run_one(which: str, spec: dict, args: argparse.Namespace) -> dict:
    """Load one pipeline, generate 1 + repeats times; timings, memory, and the last video saved
    to `<out>/<which>.pt` as (b, 3, f, h, w) float32 in [0, 1]."""
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = args.device, DTYPES[args.dtype]
    cuda = torch.device(device).type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    latents = torch.load(spec["latents"], weights_only=True)

    t0 = time.perf_counter()
    pipe, unet = (load_ours if which == "ours" else load_diffusers)(spec, device, dtype)
    make_resident(pipe.text_encoder, pipe.vae, unet)
    sync()
    load_s = time.perf_counter() - t0
    load_before = load_average()

    marks: list[float] = []

    def pre_hook(module, inputs):
        sync()
        marks.append(time.perf_counter())

    def post_hook(module, inputs, output):
        sync()
        marks.append(time.perf_counter())

    if which == "ours":  # around the (possibly compiled) UNet: a hook would be traced into it
        call_unet = pipe.call_unet

        def timed_call(*a, **kw):
            pre_hook(None, None)
            out = call_unet(*a, **kw)
            post_hook(None, None, None)
            return out

        pipe.call_unet = timed_call
    else:
        unet.register_forward_pre_hook(pre_hook)
        unet.register_forward_hook(post_hook)

    common = dict(
        negative_prompt=args.negative_prompt,
        num_frames=args.frames,
        height=args.size,
        width=args.size,
        num_inference_steps=args.steps,
        guidance_scale=args.guidance,
    )

    def generate() -> torch.Tensor:
        if which == "ours":
            return pipe(args.prompt, latents=latents, progress=False, **common).frames
        out = pipe(
            prompt=args.prompt, latents=latents.to(device, dtype), output_type="pt", **common
        )
        return out.frames.permute(0, 2, 1, 3, 4)  # (b, f, c, h, w) -> (b, c, f, h, w)

    gc.collect()
    mem: dict = {}
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        mem["before_mib"] = torch.cuda.memory_allocated(device) / 2**20
    else:
        mem["load_peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mem["peak_reset"] = reset_peak_rss()
        mem["before_mib"] = rss_kib() / 1024

    runs = []
    video = None
    for _ in range(1 + args.repeats):
        marks.clear()
        sync()
        start, cpu_start = time.perf_counter(), time.process_time()
        with torch.no_grad():
            video = generate()
        sync()
        total, cpu = time.perf_counter() - start, time.process_time() - cpu_start
        denoise = marks[-1] - marks[0]
        runs.append(dict(total_s=total, cpu_s=cpu, denoise_s=denoise, unet_calls=len(marks) // 2))

    if cuda:
        mem["peak_mib"] = torch.cuda.max_memory_allocated(device) / 2**20
        mem["total_peak_mib"] = mem["peak_mib"]
    else:
        mem["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        mem["total_peak_mib"] = max(mem["peak_mib"], mem["load_peak_mib"])
    mem["generation_mib"] = mem["peak_mib"] - mem["before_mib"]

    video_path = Path(spec["out"]) / f"{which}.pt"
    torch.save(video.detach().float().cpu().contiguous(), video_path)
    result = dict(
        which=which,
        load_s=load_s,
        warmup=runs[0],
        runs=runs[1:],
        memory=mem,
        video=str(video_path),
        threads=torch.get_num_threads(),
        load_average=[load_before, load_average()],
    )
    pipe = unet = None  # release the models before the next pipeline (CUDA, in-process)
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_subprocess(which: str, spec_path: Path, args: argparse.Namespace) -> dict:
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        *args.argv,
        "--worker",
        which,
        "--spec",
        str(spec_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith(RESULT_MARKER)]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-6000:])
        raise SystemExit(f"worker {which!r} failed (exit {proc.returncode})")
    return json.loads(lines[-1][len(RESULT_MARKER) :])


# -- report ----------------------------------------------------------------------------------
def median(values: list[float]) -> float:
    return statistics.median(values)


def summarize(r: dict, steps: int) -> dict:
    totals = [x["total_s"] for x in r["runs"]]
    denoise = [x["denoise_s"] for x in r["runs"]]
    return dict(
        total=median(totals),
        total_min=min(totals),
        total_max=max(totals),
        cpu=median([x["cpu_s"] for x in r["runs"]]),
        step=median(denoise) / steps,
        other=median(totals) - median(denoise),
        gen_mib=r["memory"]["generation_mib"],
        peak_mib=r["memory"]["total_peak_mib"],
        load_s=r["load_s"],
        warmup=r["warmup"]["total_s"],
    )


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    out = []
    for n, row in enumerate(rows):
        out.append(
            "| "
            + " | ".join(
                c.rjust(w) if i else c.ljust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
            + " |"
        )
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def report(args, spec, ours: dict, theirs: dict, cuda: bool) -> None:
    a, b = summarize(ours, args.steps), summarize(theirs, args.steps)
    mem_label = "max_memory_allocated" if cuda else "peak RSS"
    rows = [
        [
            "pipeline",
            "s/generation (median)",
            "min..max",
            "CPU s/generation",
            "s/step (denoise)",
            "s other (text+VAE)",
            f"{mem_label} during generation",
            "total peak",
            "load s",
            "warm-up s",
        ],
    ]
    for name, s in (("ours (AnimationPipeline)", a), ("diffusers (AnimateDiffPipeline)", b)):
        rows.append(
            [
                name,
                f"{s['total']:.3f}",
                f"{s['total_min']:.3f}..{s['total_max']:.3f}",
                f"{s['cpu']:.3f}",
                f"{s['step']:.4f}",
                f"{s['other']:.3f}",
                f"{s['gen_mib']:.0f} MiB",
                f"{s['peak_mib']:.0f} MiB",
                f"{s['load_s']:.1f}",
                f"{s['warmup']:.3f}",
            ]
        )
    rows.append(
        [
            "ratio ours/diffusers",
            f"{a['total'] / b['total']:.3f}",
            "",
            f"{a['cpu'] / b['cpu']:.3f}" if b["cpu"] else "",
            f"{a['step'] / b['step']:.3f}",
            f"{a['other'] / b['other']:.3f}" if b["other"] else "",
            f"{a['gen_mib'] / b['gen_mib']:.3f}" if b["gen_mib"] > 0 else "",
            f"{a['peak_mib'] / b['peak_mib']:.3f}",
            "",
            "",
        ]
    )
    print(table(rows))

    v_ours = torch.load(ours["video"], weights_only=True)
    v_diff = torch.load(theirs["video"], weights_only=True)
    if v_ours.shape != v_diff.shape:
        print(
            f"\nvideos differ in shape: ours {tuple(v_ours.shape)}, diffusers {tuple(v_diff.shape)}"
        )
    else:
        d = (v_ours - v_diff).abs()
        scale = v_diff.abs().max().item() or 1.0
        print(
            f"\nvideo difference ours vs diffusers, {tuple(v_ours.shape)} in [0, 1]: "
            f"max abs {d.max().item():.3e} (relative {d.max().item() / scale:.3e}), "
            f"mean abs {d.mean().item():.3e}"
        )
        print(
            "  (expected ~1e-1: diffusers' motion-module GroupNorm pools over frames; "
            "information only)"
        )
    print(
        f"\nper-run seconds, ours: {[round(x['total_s'], 3) for x in ours['runs']]}; "
        f"diffusers: {[round(x['total_s'], 3) for x in theirs['runs']]}"
    )
    print(
        f"load average (1/5/15 min) before -> after timing, ours: "
        f"{' -> '.join(ours['load_average'])}; diffusers: {' -> '.join(theirs['load_average'])}"
    )
    print(
        "CPU s/generation: process CPU time (all threads) per generation, median; with "
        "--threads 1 it is the figure least disturbed by other load on the machine"
    )
    calls = {ours["runs"][0]["unet_calls"], theirs["runs"][0]["unet_calls"]}
    if calls != {args.steps}:
        print(f"note: UNet calls per generation {calls}, expected {args.steps}")
    if not cuda:
        if not (ours["memory"]["peak_reset"] and theirs["memory"]["peak_reset"]):
            print(
                "note: could not reset the peak RSS after loading; 'during generation' may "
                "include the load-time peak"
            )
        print(
            "memory: peak RSS during generation minus RSS before it (each pipeline in its own "
            "process); total peak = the process's peak RSS, loading included"
        )
    else:
        print(
            "memory: torch.cuda.max_memory_allocated minus memory allocated before generating; "
            "total peak = max_memory_allocated (weights included)"
        )
    if args.dtype == "fp16":
        print(
            "note: in fp16 ours decodes in fp16 and decodes a chunk that overflows again in "
            "fp32; diffusers' pipeline is all fp16"
        )
    print(f"load average at end: {load_average()}")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    args.argv = argv
    if args.worker:
        spec = json.loads(Path(args.spec).read_text())
        print(RESULT_MARKER + json.dumps(run_one(args.worker, spec, args)), flush=True)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    if str(args.device).startswith("cuda") and torch.cuda.is_available():
        device = f"device: {args.device} = {gpu_line(args.device)}"
    else:
        device = f"device: {args.device} (no GPU used)"
    for line in machine_info(args, device, ("diffusers", "transformers")):
        print(line)
    cuda = torch.device(args.device).type == "cuda"
    isolate = args.isolate or not cuda
    work = Path(tempfile.mkdtemp(prefix="bench_generate_", dir=args.workdir))
    try:
        quiet()
        spec = prepare(args, work)
        spec_path = work / "spec.json"
        spec_path.write_text(json.dumps(spec))
        print(
            f"weights: base={spec['base']} motion_module={spec['motion_module']} "
            f"({spec['motion_version']}); diffusers MotionAdapter converted to {spec['adapter']}"
            f" (prepared in {spec['prepare_s']:.1f} s)"
        )
        print(
            f"settings: {args.frames} frames, {args.size}x{args.size}, latents "
            f"{tuple(spec['latent_shape'])}, {args.steps} DDIM steps, guidance {args.guidance}, "
            f"{args.dtype}, 1 warm-up + {args.repeats} timed, "
            f"{'one subprocess per pipeline' if isolate else 'in-process'}"
        )
        print(flush=True)
        results = {}
        for which in ("ours", "diffusers"):
            results[which] = (
                run_subprocess(which, spec_path, args) if isolate else run_one(which, spec, args)
            )
        print(f"torch threads in workers: {results['ours']['threads']}\n")
        report(args, spec, results["ours"], results["diffusers"], cuda)
    finally:
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
