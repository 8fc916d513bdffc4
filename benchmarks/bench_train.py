"""Time training steps of `animatediff.training` and report clips per second and peak memory.

    python benchmarks/bench_train.py                       # motion stage, built-in tiny model,
                                                           # 64x64 x 8 frames, batch 2
    python benchmarks/bench_train.py --stage adapter --steps 10
    python benchmarks/bench_train.py --sd15 --size 256 --frames 16 --batch-size 1 \
        --mixed-precision bf16 --gradient-checkpointing    # SD1.5-size random UNet + v3 module
    python benchmarks/bench_train.py --config my_motion.yaml --steps 20

The run is a real `Trainer.fit()` on synthetic clips (a coloured square moving over a dark
background, written as MP4 once into the work folder), with checkpoints, validation and trackers
off. Throughput comes from the trainer's own per-step log (`samples_per_s` in metrics.jsonl with
`log_every: 1`: samples of the global batch over the wall time from the end of one step to the end
of the next, data loading included); the first `--warmup` steps are left out and the median of the
rest is reported, with min..max and the whole-run average beside it. A sample is a clip of
`--frames` frames for the video stages (motion, motion_lora) and one frame for the image stages.

Peak memory: on CUDA `torch.cuda.max_memory_allocated` (reset once the trainer is built, so it is
the training peak, weights included); on CPU the peak RSS during training (`ru_maxrss` after the
load-time peak is cleared through `/proc/self/clear_refs`, Linux) and the process's peak over its
whole life beside it.

On a small or shared CPU machine pass `--threads 1`: with torch's default (one thread per core)
OpenMP threads spin-waiting for a core another job holds made a tiny-model step 30x slower in
measurements (45 s instead of 1.4 s on a 2-core VM with load average 4).

`--sd15` builds SD1.5's architecture with random weights (UNet 320/640/1280/1280 with
cross-attention 768, VAE 128/256/512/512, CLIP ViT-L-sized text encoder with the built-in model's
word tokenizer) into the work folder once (about 4.5 GB; reused with `--workdir`), and trains a
new v3-shaped motion module on it (or the stage asked for).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from common import gpu_line, load_average, machine_info, peak_rss_mib, quiet, reset_peak_rss


# -- arguments ---------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--stage", choices=["motion", "motion_lora", "adapter", "image_finetune"], default="motion"
    )
    p.add_argument(
        "--config",
        help="a training YAML to time instead (its data, base, stage...); "
        "steps, output_dir, logging, checkpoints and validation are overridden",
    )
    p.add_argument(
        "--sd15",
        action="store_true",
        help="SD1.5-size random base model instead of the built-in tiny one",
    )
    p.add_argument("--size", type=int, default=64, help="height = width in pixels (default 64)")
    p.add_argument("--frames", type=int, default=8, help="frames per clip (default 8)")
    p.add_argument("--batch-size", type=int, default=2, help="per process (default 2)")
    p.add_argument("--steps", type=int, default=5, help="timed steps (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed first steps (default 1)")
    p.add_argument("--mixed-precision", choices=["no", "fp16", "bf16"], default="no")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--rank", type=int, default=2, help="LoRA rank of the LoRA stages")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--clips", type=int, default=8, help="synthetic clips to write (default 8)")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (default 0)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--workdir",
        help="where data, models and the run go (default: a temporary "
        "folder, deleted afterwards); reuse it to skip building --sd15 again",
    )
    p.add_argument("--json", action="store_true", help="also print the result as one JSON line")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.size % 8:
        p.error("--size must be a multiple of 8")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be at least 1 and --warmup at least 0")
    return args


# -- inputs ------------------------------------------------------------------------------------
def write_clips(folder: Path, count: int, frames: int, size: int) -> Path:
    """`count` MP4 clips of a square moving in different directions, with captions."""
    from animatediff.video import save_video

    folder.mkdir(parents=True, exist_ok=True)
    colours = [(1, 0.1, 0.1), (0.1, 0.9, 0.1), (0.1, 0.2, 1), (1, 0.9, 0.1), (0.9, 0.2, 0.9)]
    directions = [(1, 0, "right"), (0, 1, "down"), (-1, 0, "left"), (0, -1, "up")]
    side = max(size // 4, 2)
    travel = size - side
    for i in range(count):
        name = f"clip{i:03d}"
        if (folder / f"{name}.mp4").exists():
            continue
        colour = colours[i % len(colours)]
        dx, dy, word = directions[i % len(directions)]
        video = torch.tensor([0.15, 0.15, 0.25]).view(3, 1, 1, 1).repeat(1, frames, size, size)
        for f in range(frames):
            along = round(travel * f / max(frames - 1, 1))
            x = along if dx > 0 else travel - along if dx < 0 else travel // 2
            y = along if dy > 0 else travel - along if dy < 0 else travel // 2
            for c in range(3):
                video[c, f, y : y + side, x : x + side] = colour[c]
        save_video(video, folder / f"{name}.mp4", fps=8, overwrite=True)
        (folder / f"{name}.txt").write_text(f"a square moving {word}\n")
    return folder


def build_sd15_random(folder: Path) -> Path:
    """SD1.5's architecture with random weights as a diffusers folder (built once): `sd15`'s
    UNet, VAE and text encoder shapes, with the built-in model's word tokenizer."""
    if (folder / "model_index.json").exists():
        return folder
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from sd15 import TEXT, UNET, VAE
    from transformers import CLIPTokenizer

    from animatediff.builtin import write_word_tokenizer
    from animatediff.builtin.model import random_text_encoder
    from animatediff.checkpoints.base import ImageModel, save_base_folder

    print(f"building a random SD1.5-size model in {folder} (once)...", flush=True)
    tmp = folder.with_name(folder.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    torch.manual_seed(0)
    write_word_tokenizer(tmp / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(tmp / "tokenizer")
    unet = UNet2DConditionModel(**UNET)
    vae = AutoencoderKL(**VAE)
    text = random_text_encoder(tokenizer, **{k: v for k, v in TEXT.items() if k != "vocab_size"})
    save_base_folder(tmp, ImageModel(tokenizer, text, vae, unet, source="sd15-random"))
    os.replace(tmp, folder)
    return folder


def random_motion_module(path: Path, channels: tuple[int, ...]) -> Path:
    """A v3-shaped module with random non-zero outputs (what a MotionLoRA adapts)."""
    if path.exists():
        return path
    from animatediff.checkpoints.motion import save_motion_module
    from animatediff.motion import MotionModuleConfig, MotionModules

    torch.manual_seed(1)
    module = MotionModules(MotionModuleConfig.preset("v3", block_out_channels=channels))
    with torch.no_grad():
        for _, m in module.named_temporal_modules():
            m.temporal_transformer.proj_out.weight.normal_(0, 0.02)
            m.temporal_transformer.proj_out.bias.normal_(0, 0.02)
    return save_motion_module(module, path)


def make_config(args: argparse.Namespace, work: Path) -> dict:
    total = args.warmup + args.steps
    overrides = {
        "output_dir": str(work / "run"),
        "report_to": [],
        "validation": {"prompts": [], "every": 0},
        "checkpoint": {"every": 0},
    }
    train = {"steps": total, "log_every": 1}
    if args.config:
        import yaml

        cfg = yaml.safe_load(Path(args.config).read_text())
        cfg = {**cfg, **overrides}
        cfg["train"] = {**cfg.get("train", {}), **train}
        return cfg
    base = None
    channels = (32, 64, 64, 64)  # the built-in model's UNet
    if args.sd15:
        base = str(build_sd15_random(work / "sd15_random"))
        channels = (320, 640, 1280, 1280)
    video = args.stage in ("motion", "motion_lora")
    cfg = {
        "stage": args.stage,
        "base": base,
        "data": {
            "videos": str(
                write_clips(
                    work / f"clips-{args.size}-{args.frames}",
                    args.clips,
                    args.frames + 4,
                    args.size,
                )
            ),
            "num_frames": args.frames if video else 1,
            "sample_size": args.size,
            "sample_stride": 1,
            "num_workers": args.workers,
        },
        "train": {
            **train,
            "batch_size": args.batch_size,
            "learning_rate": args.lr,
            "rank": args.rank,
            "mixed_precision": args.mixed_precision,
            "gradient_checkpointing": args.gradient_checkpointing,
        },
        **overrides,
    }
    if args.stage == "motion_lora":
        name = "sd15" if args.sd15 else "tiny"
        cfg["motion_module"] = str(
            random_motion_module(work / f"mm_v3_random_{name}.safetensors", channels)
        )
    return cfg


# -- the run -----------------------------------------------------------------------------------
def run(args: argparse.Namespace, work: Path) -> dict:
    from animatediff.training import Trainer, parse_config

    cfg = make_config(args, work)
    shutil.rmtree(cfg["output_dir"], ignore_errors=True)
    config = parse_config(cfg)
    t0 = time.perf_counter()
    trainer = Trainer(config)
    build_s = time.perf_counter() - t0
    cuda = trainer.accelerator.device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    lifetime_peak_before = peak_rss_mib()
    cleared = reset_peak_rss()
    model = trainer.accelerator.unwrap_model(trainer.model)
    trainable = sum(p.numel() for p in model.trainable())
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    frozen += sum(
        p.numel()
        for part in (trainer.image.vae, trainer.image.text_encoder)
        for p in part.parameters()
    )
    t0 = time.perf_counter()
    trainer.fit()
    fit_s = time.perf_counter() - t0
    rows = [
        json.loads(line)
        for line in (Path(cfg["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]
    timed = [r["samples_per_s"] for r in rows if r["step"] > args.warmup]
    result = {
        "stage": config.stage,
        "base": config.base or "built-in tiny",
        "size": list(config.data.sample_size),
        "frames": config.data.num_frames,
        "batch_size": config.train.batch_size,
        "processes": trainer.accelerator.num_processes,
        "mixed_precision": config.train.mixed_precision,
        "gradient_checkpointing": config.train.gradient_checkpointing,
        "device": str(trainer.accelerator.device),
        "trainable_params": trainable,
        "frozen_params": frozen,
        "build_s": build_s,
        "fit_s": fit_s,
        "steps": len(rows),
        "timed_steps": len(timed),
        "samples_per_s_median": statistics.median(timed),
        "samples_per_s_min": min(timed),
        "samples_per_s_max": max(timed),
        "samples_per_s_whole_run": sum(r["samples_per_s"] ** -1 for r in rows) ** -1 * len(rows)
        if rows
        else 0.0,
        "last_loss": rows[-1]["loss"] if rows else None,
        "load_average_end": load_average(),
    }
    if cuda:
        result["peak_memory_mib"] = torch.cuda.max_memory_allocated() / 2**20
        result["peak_memory_kind"] = "torch.cuda.max_memory_allocated during training"
    else:
        result["peak_memory_mib"] = peak_rss_mib()
        result["peak_memory_kind"] = (
            "peak RSS during training" if cleared else "peak RSS of the process (could not clear)"
        )
        result["lifetime_peak_rss_mib"] = max(lifetime_peak_before, result["peak_memory_mib"])
    return result


def report(args: argparse.Namespace, info: list[str], r: dict) -> None:
    unit = f"clips of {r['frames']} frames" if r["stage"] in ("motion", "motion_lora") else "frames"
    print()
    for line in info:
        print(line)
    print(
        f"run: stage {r['stage']} on {r['base']} | {r['size'][0]}x{r['size'][1]} px | "
        f"batch {r['batch_size']} x {r['processes']} process(es) | mixed precision "
        f"{r['mixed_precision']} | gradient checkpointing {r['gradient_checkpointing']} | "
        f"{r['device']}"
    )
    print(
        f"parameters: {r['trainable_params'] / 1e6:.2f} M trainable, "
        f"{r['frozen_params'] / 1e6:.2f} M frozen"
    )
    print(
        f"steps: {r['steps']} ({args.warmup} warm-up, {r['timed_steps']} timed); trainer built in "
        f"{r['build_s']:.1f} s, fit {r['fit_s']:.1f} s; last loss {r['last_loss']:.4f}"
    )
    print(
        f"throughput: {r['samples_per_s_median']:.3f} {unit}/s (median of timed steps; "
        f"min {r['samples_per_s_min']:.3f}, max {r['samples_per_s_max']:.3f}; whole run "
        f"{r['samples_per_s_whole_run']:.3f}) = "
        f"{r['batch_size'] * r['processes'] / r['samples_per_s_median']:.2f} s/step"
    )
    line = f"peak memory: {r['peak_memory_mib']:.0f} MiB ({r['peak_memory_kind']})"
    if "lifetime_peak_rss_mib" in r:
        line += f"; process lifetime peak RSS {r['lifetime_peak_rss_mib']:.0f} MiB"
    print(line)
    print(f"load average at end: {r['load_average_end']}")
    if args.json:
        print("BENCH_RESULT " + json.dumps(r))


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    quiet()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = (
        f"gpu: {gpu_line()}" if torch.cuda.is_available() else "gpu: none (training on the CPU)"
    )
    info = machine_info(args, device, ("diffusers", "transformers", "accelerate"))
    if args.workdir:
        work = Path(args.workdir)
        work.mkdir(parents=True, exist_ok=True)
        report(args, info, run(args, work))
        return
    with tempfile.TemporaryDirectory(prefix="bench_train-") as tmp:
        report(args, info, run(args, Path(tmp)))


if __name__ == "__main__":
    main()
