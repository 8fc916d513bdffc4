"""`animatediff generate`, its second half: load the models (once per distinct set) and render
each checked run, writing the video and its settings JSON atomically."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch

from .. import __version__
from ..options import ModelOptions
from ..pipeline import AnimationPipeline
from .config import Run, settings_json
from .flags import UsageError
from .generate import Job

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def execute(job: Job) -> None:
    dev = device(job.runs[0].models.device)
    pipe, key = None, None
    for r, output in zip(job.runs, job.outputs):
        if r.models != key:  # consecutive runs on the same models share the pipeline
            pipe, key = load(r.models, dev), r.models
        video = pipe(r.prompt, r.negative_prompt, options=r.options())
        save(video, output, job.overwrite, r)


def device(name: str) -> str:
    """`auto` -> the best available; a named device must exist."""
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        return "mps" if torch.backends.mps.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise UsageError(
            f"--device {name!r}: not a device (auto, cpu, cuda, cuda:N, mps)"
        ) from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {name}: CUDA is not available on this machine")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UsageError(f"--device {name}: MPS is not available on this machine")
    return name


def dtype(name: str | None, device_name: str) -> torch.dtype:
    return DTYPES[name or ("fp16" if device_name.startswith("cuda") else "fp32")]


def load(models: ModelOptions, device_name: str) -> AnimationPipeline:
    kwargs = {f.name: getattr(models, f.name) for f in dataclasses.fields(models)}
    kwargs.update(device=device_name, dtype=dtype(models.dtype, device_name))
    kwargs["controlnets"] = list(models.controlnets) or None
    return AnimationPipeline.load(**kwargs)


def save(video, output: Path, overwrite: bool, r: Run) -> list[Path]:
    paths = video.save(output, overwrite=overwrite)
    extra = {"outputs": [str(p) for p in paths], "animatediff_version": __version__}
    meta = output.parent / f"{output.name}.json"
    tmp = meta.with_name(f".{meta.name}.tmp")
    tmp.write_text(settings_json(r, video.info, r.models, extra))
    os.replace(tmp, meta)  # atomic, like the video itself
    for p in paths:
        print(f"saved {p}")
    print(f"settings {meta}")
    return paths
