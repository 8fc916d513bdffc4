"""Saving what `animatediff generate` made: each video with its settings, embedded in the video
and in a JSON beside it (package versions, device, dtype, the SHA-256 of every model and input
file, every option), claimed without replacing anything (`cli/outputs.py`); a `--config` batch
also gets `sample.gif` (all its videos in a grid) and `config.yaml` (a copy), as officially."""

from __future__ import annotations

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
from ..checkpoints.hashes import sha256
from ..video import Video, read_video, video_grid
from ..video.files import claim, remove, write_text
from ..video.write import encoded
from .config import PATH_OPTIONS, Run, settings_json
from .flags import UsageError, printable
from .generate import Job
from .outputs import CONFIG_COPY, GRID_NAME, Slot, settings_path

log = logging.getLogger("animatediff")


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


def compare_hashes(recorded: Mapping[str, str], hashes: Mapping[str, str]) -> None:
    for path, digest in recorded.items():
        if path in hashes and hashes[path] != digest:
            log.warning("%s changed since the video was made: the result will differ", path)


def provenance(dev: str, hashes: dict[str, str]) -> dict:
    """What made the videos: package and library versions, the device, the files' hashes."""
    return dict(
        animatediff_version=__version__,
        versions=dict(
            python=platform.python_version(),
            torch=torch.__version__,
            diffusers=diffusers.__version__,
            transformers=transformers.__version__,
        ),
        device=str(torch.device(dev)),
        sha256=hashes,
    )


# -- saving --------------------------------------------------------------------------------------
def save(video: Video, slots: list[Slot], overwrite: bool, r: Run, made_by: dict) -> list[Path]:
    """Each video of the batch with its own settings (its seed: a batch's video i was drawn
    from seed + i, so `--from` remakes it alone), embedded and beside it."""
    seeds = video.info.get("seeds") or [None] * video.batch_size
    paths = []
    for i, slot in enumerate(slots):
        info = _one_video(video.info, i, seeds)
        embedded = settings_json(info, r.models, made_by)
        with encoded(video.frames[i], slot.path, video.fps, metadata=embedded) as tmp:
            path = _claim_first(tmp, slot, overwrite, info, r.models, made_by)
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


def _claim_first(tmp: Path, slot: Slot, overwrite: bool, info, models, made_by) -> Path:
    """Claim the slot's first free name: the settings JSON, then the video; a name another
    run took meanwhile is never replaced (a slot the user named fails, with one line)."""
    for path in slot.candidates():
        meta = settings_path(path)
        text = settings_json(info, models, {**made_by, "outputs": [str(path)]})
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
    replace = job.overwrite or job.resume  # a resumed batch refreshes its summary
    videos = [read_video(p) for paths in made for p in paths if Path(p).exists()]
    if videos:
        fps = job.runs[0].options().output.fps
        with encoded(video_grid(videos), folder / GRID_NAME, fps) as tmp:
            claim(tmp, folder / GRID_NAME, replace)
        print(printable(f"saved {folder / GRID_NAME}"))
    text = job.config.read_text(encoding="utf-8")
    write_text(folder / CONFIG_COPY, text, overwrite=replace)
    print(printable(f"config {folder / CONFIG_COPY}"))
