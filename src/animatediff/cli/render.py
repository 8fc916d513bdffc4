"""`animatediff generate`, its second half: load the models (once per distinct set), render each
checked run, and save every video with its settings: embedded in the video and in a JSON
beside it (package versions, device, dtype, the SHA-256 of every model and input file, every
option), each claimed without replacing anything (`cli/outputs.py`). A `--config` batch also
gets `sample.gif` (all its videos in a grid) and `config.yaml` (a copy), as officially."""

from __future__ import annotations

import dataclasses
import logging
import os
import platform
from collections.abc import Iterator, Mapping
from pathlib import Path

import diffusers
import torch
import transformers

from .. import __version__
from ..builtin.model import resolve as resolve_builtin
from ..checkpoints.base import check_pickled_weights
from ..checkpoints.hashes import sha256
from ..checkpoints.motion import build_motion_module, read_motion_checkpoint
from ..options import ModelOptions
from ..pipeline import AnimationPipeline
from ..pipeline.prompt import unknown_words
from ..pipeline.prompt_syntax import parse_prompt_attention
from ..video import Video, VideoReadError, read_video, video_grid, video_info
from ..video.files import claim, remove, write_text
from ..video.write import encoded
from .config import PATH_OPTIONS, Run, settings_json
from .flags import UsageError, printable
from .generate import Job
from .outputs import CONFIG_COPY, GRID_NAME, Slot, settings_path

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
        _compare(r.recorded, hashes)
        quiet = log.getEffectiveLevel() > logging.WARNING
        video = pipe(r.prompt, r.negative_prompt, options=r.options(), progress=not quiet)
        made.append(save(video, slots, job.overwrite, r, dict(device=dev, sha256=hashes)))
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


# -- provenance --------------------------------------------------------------------------------
def file_hashes(r: Run) -> dict[str, str]:
    """SHA-256 of every model file or folder and every input file the run reads."""
    return {str(p): sha256(p) for p in dict.fromkeys(_files(r)) if Path(p).exists()}


def _files(r: Run) -> Iterator[str]:
    m = r.models
    base, motion = resolve_builtin(m.base, m.motion_module)
    yield from (str(base), str(motion))
    for value in (m.personal, m.vae, m.sparsectrl, m.ip_adapter, m.image_encoder):
        if value is not None:
            yield str(value)
    yield from (str(p) for p, _ in (*m.loras, *m.motion_loras))
    yield from (str(p) for p in (*m.controlnets, *m.embeddings))
    if m.adapter is not None:
        yield str(m.adapter[0])
    options = r.options().flat()
    for name in PATH_OPTIONS:
        values = options[name]
        for value in values if isinstance(values, list | tuple) else [values]:
            if isinstance(value, str | os.PathLike):
                yield str(value)


def _compare(recorded: Mapping[str, str], hashes: Mapping[str, str]) -> None:
    for path, digest in recorded.items():
        if path in hashes and hashes[path] != digest:
            log.warning("%s changed since the video was made: the result will differ", path)


def versions(dev: str) -> dict:
    return dict(
        animatediff_version=__version__,
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
        ),
        device=str(torch.device(dev)),
    )


# -- saving --------------------------------------------------------------------------------------
def save(video: Video, slots: list[Slot], overwrite: bool, r: Run, extra: dict) -> list[Path]:
    """Each video of the batch with its own settings (its seed: a batch's video i was drawn
    from seed + i, so `--from` remakes it alone), embedded and beside it."""
    provenance = {**versions(extra["device"]), "sha256": extra["sha256"]}
    seeds = video.info.get("seeds") or [None] * video.batch_size
    paths = []
    for i, slot in enumerate(slots):
        info = _one_video(video.info, i, seeds)
        embedded = settings_json(info, r.models, provenance)
        with encoded(video.frames[i], slot.path, video.fps, metadata=embedded) as tmp:
            path = _claim_first(tmp, slot, overwrite, info, r.models, provenance)
        print(printable(f"saved {path}"))
        print(printable(f"settings {settings_path(path)}"))
        paths.append(path)
    return paths


def _one_video(info: dict, i: int, seeds: list) -> dict:
    if len(seeds) == 1:
        return info
    sampling = {**info["sampling"], "seed": seeds[i], "num_videos_per_prompt": 1}
    batch = {"index": i, "videos": len(seeds), "seed": seeds[0]}
    return {**info, "sampling": sampling, "seeds": [seeds[i]], "batch": batch}


def _claim_first(tmp: Path, slot: Slot, overwrite: bool, info, models, provenance) -> Path:
    """Claim the slot's first free name: the settings JSON, then the video; a name another
    run took meanwhile is never replaced (a slot the user named fails, with one line)."""
    for path in slot.candidates():
        meta = settings_path(path)
        text = settings_json(info, models, {**provenance, "outputs": [str(path)]})
        try:
            write_text(meta, text, overwrite)
        except FileExistsError:
            if slot.renamable:
                continue
            raise UsageError(f"{meta} appeared while rendering; nothing was replaced") from None
        try:
            claim(tmp, path, overwrite)
            return path
        except FileExistsError:
            remove(meta)
            if not slot.renamable:
                raise UsageError(f"{path} appeared while rendering; nothing was replaced") from None
        except BaseException:
            remove(meta)
            raise
    raise UsageError(f"{slot.path}: no free name left beside it")


def save_extras(job: Job, made: list[list[Path]]) -> None:
    """A config batch's `sample.gif` (every video, made now or before) and `config.yaml`."""
    folder = job.folder
    replace = job.overwrite or not all(job.make)  # a resumed batch refreshes its summary
    videos = [read_video(p) for paths in made for p in paths if Path(p).exists()]
    if videos:
        fps = job.runs[0].options().output.fps
        with encoded(video_grid(videos), folder / GRID_NAME, fps) as tmp:
            claim(tmp, folder / GRID_NAME, replace)
        print(printable(f"saved {folder / GRID_NAME}"))
    text = job.config.read_text(encoding="utf-8")
    write_text(folder / CONFIG_COPY, text, overwrite=replace)
    print(printable(f"config {folder / CONFIG_COPY}"))
