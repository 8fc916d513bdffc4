"""`animatediff generate`, its second half: the checks that need the heavy modules, then load
the models (once per distinct set), render each checked run and save it (`cli/save.py`)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import torch
import transformers

from ..checkpoints.base import check_pickled_weights
from ..checkpoints.motion import build_motion_module, read_motion_checkpoint
from ..options import ModelOptions
from ..pipeline import AnimationPipeline
from ..pipeline.prompt import unknown_words
from ..pipeline.prompt_syntax import parse_prompt_attention
from ..video import VideoReadError, video_info
from .config import Run
from .flags import UsageError
from .generate import Job
from .save import compare_hashes, file_hashes, provenance, save, save_extras

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
log = logging.getLogger("animatediff")


def execute(job: Job) -> None:
    dev = device(job.runs[0].models.device)
    for r, make in zip(job.runs, job.make):
        if make:
            preflight(r)
    if log.getEffectiveLevel() > logging.INFO:
        transformers.utils.logging.disable_progress_bar()
    pipe, key, made = None, None, []
    for r, slots, make in zip(job.runs, job.outputs, job.make):
        if not make:
            made.append([s.path for s in slots])
            continue
        if r.models != key:  # consecutive runs on the same models share the pipeline
            pipe, key = load(r.models, dev), r.models
        _warn_unknown_words(pipe, r)
        hashes = file_hashes(r)
        compare_hashes(r.recorded, hashes)
        quiet = log.getEffectiveLevel() > logging.WARNING
        video = pipe(r.prompt, r.negative_prompt, options=r.options(), progress=not quiet)
        made.append(save(video, slots, job.overwrite, r, provenance(dev, hashes)))
    if job.config is not None:
        save_extras(job, made)


def preflight(r: Run) -> None:
    """The checks that need the heavy modules but no model: prompt syntax, input lengths."""
    p = r.options().prompting
    prompts = r.prompt.values() if isinstance(r.prompt, Mapping) else [r.prompt]
    negatives = r.negative_prompt.values() if isinstance(r.negative_prompt, Mapping) else []
    for text in [p.prompt_head, *prompts, p.prompt_tail, *negatives, r.negative_prompt]:
        if isinstance(text, str):
            try:
                parse_prompt_attention(text)
            except ValueError as e:
                raise UsageError(str(e)) from None
    options = r.options()
    init, frames = options.init.init_video, options.sampling.num_frames
    if isinstance(init, str) and frames is not None:
        try:
            have = video_info(init).num_frames
        except VideoReadError as e:
            raise UsageError(f"--init-video: {e}") from None
        if 1 < have < frames:
            raise UsageError(f"--init-video {init}: {have} frames, fewer than --frames {frames}")


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
    if dev.type == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"--device {name}: no Intel GPU (XPU) is available on this machine")
    return name


def dtype(name: str | None, device_name: str) -> torch.dtype:
    return DTYPES[name or ("fp16" if device_name.startswith("cuda") else "fp32")]


def load(models: ModelOptions, device_name: str) -> AnimationPipeline:
    kwargs = {f.name: getattr(models, f.name) for f in dataclasses.fields(models)}
    kwargs.update(device=device_name, dtype=dtype(models.dtype, device_name))
    kwargs["controlnets"] = list(models.controlnets) or None
    for folder in (*models.controlnets, models.image_encoder):
        if folder is not None:
            check_pickled_weights(folder)
    if models.adapter is None or models.motion_module is None:
        return AnimationPipeline.load(**kwargs)
    # the adapter goes with v3 modules: read the module first, to check before the base loads
    ckpt = read_motion_checkpoint(models.motion_module, models.motion_version)
    _check_adapter(models, ckpt)
    pipe = AnimationPipeline.load(**{**kwargs, "motion_module": build_motion_module(ckpt)})
    pipe.motion_release = ckpt.release
    return pipe


def _check_adapter(models: ModelOptions, ckpt) -> None:
    version = ckpt.config.version
    if version != "v3":
        raise UsageError(
            f"--adapter: the domain adapter goes with v3 motion modules, and "
            f"{models.motion_module} is {version} ({ckpt.version_source}); leave out --adapter, "
            "or pass --motion-version v3 if the module is v3"
        )


def _warn_unknown_words(pipe: AnimationPipeline, r: Run) -> None:
    """The built-in model knows a few dozen words; others are spelled out and ignored."""
    if r.models.base is not None:
        return
    p = r.options().prompting
    prompts = r.prompt.values() if isinstance(r.prompt, Mapping) else [r.prompt]
    words: list[str] = []
    for text in [p.prompt_head, *prompts, p.prompt_tail]:
        words += [w for w in unknown_words(pipe.tokenizer, text) if w not in words]
    if words:
        log.warning(
            "the built-in model does not know %s (it knows: %s)",
            ", ".join(repr(w) for w in words),
            ", ".join(sorted(_known_words(pipe))),
        )


def _known_words(pipe: AnimationPipeline) -> list[str]:
    vocab = pipe.tokenizer.get_vocab()
    return [t[:-4] for t in vocab if t.endswith("</w>") and len(t) > 5 and t[:-4].isalpha()]
