"""A few-step student against its teacher on the evaluation's prompts and seeds.

    animatediff evaluate --student runs/distill/motion_module.safetensors [--student-steps 4 8]
        [--student-adapter runs/distill/distill_lora.safetensors]

The teacher is the built-in model (its base + motion module) sampled as `evaluate` samples it
(DDIM, ``--steps`` steps, guidance ``--guidance-scale``); the student is the built-in base with
the student's motion module, sampled with ``preset="auto"`` (the sampler, and the guidance, its
file's metadata calls for) at each of ``--student-steps``. Every clip metric of
``metrics.clip_metrics`` is reported side by side with the seconds per animation; a student row
"holds" when each metric is within 10% of the teacher's or better.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch

from ..builtin.model import builtin_model
from ..options import Options
from ..pipeline import AnimationPipeline
from .evaluate_settings import (
    GUIDANCE_SCALE,
    NEGATIVE_PROMPT,
    NUM_FRAMES,
    PROMPTS,
    SEEDS,
    SIZE,
    STEPS,
)
from .metrics import clip_metrics
from .report import markdown_table, save_results

# (column, metric key, higher is better)
METRICS = (
    ("text", "text_alignment", True),
    ("colour", "colour_alignment", True),
    ("shape", "shape_alignment", True),
    ("background", "background_alignment", True),
    ("consistency", "temporal_consistency", True),
    ("smoothness", "motion_smoothness", True),
    ("dynamic", "dynamic_degree", True),
    ("motion", "motion_alignment", True),
    ("watermark", "watermark_rate", False),
)
TOLERANCE = 0.10  # a student metric may be this much (relative) worse than the teacher's


def _generate(pipe, prompts: Sequence[str], seeds: Sequence[int], size: int, frames: int, **how):
    """Clips (F, H, W, 3 uint8) and captions, every prompt once per seed; the seconds spent."""
    clips, captions, seconds = [], [], 0.0
    for seed in seeds:
        start = time.perf_counter()
        video = pipe(
            list(prompts),
            negative_prompt=NEGATIVE_PROMPT,
            num_frames=frames,
            height=size,
            width=size,
            seed=seed,
            progress=False,
            **how,
        )
        seconds += time.perf_counter() - start
        frames_u8 = (video.frames.clamp(0, 1) * 255).round().to(torch.uint8)
        clips += list(frames_u8.permute(0, 2, 3, 4, 1).cpu().numpy())
        captions += list(prompts)
    return clips, captions, seconds


def _row(label: str, pipe, prompts, seeds, size, frames, how: dict) -> dict:
    clips, captions, seconds = _generate(pipe, prompts, seeds, size, frames, **how)
    settings = pipe.with_preset(_options(how)).sampling
    return {
        "model": label,
        "scheduler": settings.scheduler,
        "steps": settings.num_inference_steps,
        "guidance_scale": settings.guidance_scale,
        **clip_metrics(clips, captions),
        "seconds_per_animation": seconds / len(clips),
    }


def _options(how: Mapping):
    return Options.build(dict(how))


def holds(student: Mapping, teacher: Mapping) -> dict[str, bool]:
    """Per metric: the student is within `TOLERANCE` of the teacher, or better."""
    out = {}
    for _, key, higher in METRICS:
        s, t = student.get(key), teacher.get(key)
        if s is None or t is None:
            out[key] = s is None and t is None
        elif higher:
            out[key] = s >= t * (1 - TOLERANCE)
        else:
            out[key] = s <= t * (1 + TOLERANCE)
    return out


def compare(
    student: str | Path,
    student_steps: Sequence[int] = (4, 8),
    student_guidance: float | None = None,
    student_adapter: str | Path | None = None,
    teacher_steps: int = STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    num_prompts: int | None = None,
    seeds: Sequence[int] | None = None,
    num_frames: int = NUM_FRAMES,
    size: int = SIZE,
    device: str = "cpu",
    progress=print,
) -> dict:
    """Teacher and student rows (module docstring) and, per student row, which metrics hold.
    `student_adapter`: an image-layer LoRA distilled with the student (`distill_lora.safetensors`),
    merged at 1.0."""
    log = progress or (lambda _: None)
    prompts = PROMPTS[:num_prompts]
    seeds = tuple(seeds if seeds is not None else SEEDS)
    model = builtin_model()
    args = (prompts, seeds, size, num_frames)
    log(f"[compare] teacher: {len(prompts)} prompts x seeds {list(seeds)}, {teacher_steps} steps")
    teacher = AnimationPipeline.load(model.base, model.motion_module, device=device)
    how = {"num_inference_steps": teacher_steps, "guidance_scale": guidance_scale}
    rows = {"teacher": _row("teacher", teacher, *args, how)}
    del teacher
    adapter = None if student_adapter is None else (str(student_adapter), 1.0)
    pupil = AnimationPipeline.load(model.base, str(student), adapter=adapter, device=device)
    for steps in student_steps:
        log(f"[compare] student at {steps} steps")
        how = {"preset": "auto", "num_inference_steps": steps, "guidance_scale": student_guidance}
        row = _row(f"student {steps} steps", pupil, *args, how)
        row["holds"] = holds(row, rows["teacher"])
        row["speedup"] = rows["teacher"]["seconds_per_animation"] / row["seconds_per_animation"]
        rows[f"student_{steps}"] = row
    return {
        "settings": {"prompts": list(prompts), "seeds": list(seeds), "num_frames": num_frames},
        "teacher": {"base": str(model.base), "motion_module": str(model.motion_module)},
        "student": str(student),
        "student_adapter": None if student_adapter is None else str(student_adapter),
        "rows": rows,
    }


def format_comparison(results: Mapping) -> str:
    """Markdown: one row per model, every metric, the time per animation and the speed-up."""
    s = results["settings"]
    lines = [
        f"{len(s['prompts'])} prompts x seeds {s['seeds']}, {s['num_frames']} frames; "
        f"student: {results['student']}"
        + (f" + {results['student_adapter']}" if results.get("student_adapter") else ""),
        "",
    ]
    header = ["model", "sampler", "steps", "guidance", *(h for h, _, _ in METRICS)]
    header += ["s / animation", "speed-up", "holds"]
    rows = []
    for row in results["rows"].values():
        verdict = row.get("holds")
        short = (
            "–"
            if verdict is None
            else "yes"
            if all(verdict.values())
            else "no: " + ", ".join(k for k, ok in verdict.items() if not ok)
        )
        cells = [row["model"], row["scheduler"], row["steps"], row["guidance_scale"]]
        cells += [row.get(key) for _, key, _ in METRICS]
        speedup = row.get("speedup")
        cells += [row["seconds_per_animation"], None if speedup is None else f"{speedup:.1f}x"]
        rows.append([*cells, short])
    return "\n".join(lines + markdown_table(header, rows)) + "\n"


def run_comparison(args) -> dict:
    """`animatediff evaluate --student PATH`: print the table, optionally save the JSON."""
    results = compare(
        args.student,
        student_steps=args.student_steps,
        student_guidance=args.student_guidance,
        student_adapter=args.student_adapter,
        teacher_steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_prompts=3 if args.quick else args.prompts,
        seeds=args.seeds,
        num_frames=args.frames,
        device=args.device or "cpu",
    )
    print(format_comparison(results))
    if args.out:
        print(f"results: {save_results(results, args.out)}")
    return results
