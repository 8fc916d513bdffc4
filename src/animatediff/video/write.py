"""Write videos (float tensors in [0, 1]) as GIF, MP4, WebP or a folder of PNG frames.

Every writer encodes into a temporary sibling of the target and puts it in place in one step
(`video/files.py`), so an interrupted write never leaves a half-written file under the final
name, and without `overwrite` an existing file (even one another process made meanwhile) is
never replaced. `metadata` (text, e.g. the settings JSON) is embedded in the file: a GIF
comment, WebP XMP, an MP4 `comment` tag, a PNG `animatediff` text chunk (`animatediff.provenance`
reads it back).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import torch
from PIL import Image

from .. import provenance as meta
from ..options import OUTPUT_SUFFIXES
from .files import new_path, staged

__all__ = ["SUPPORTED_SUFFIXES", "Video", "encoded", "save_video", "to_uint8_frames"]

SUPPORTED_SUFFIXES = OUTPUT_SUFFIXES
PNG_FOLDER = "png"  # format name for "no suffix / existing directory"
MP4_CRF = 18
WEBP_QUALITY = 90


def to_uint8_frames(frames: torch.Tensor) -> np.ndarray:
    """Convert a (3, f, h, w) float tensor in [0, 1] to a (f, h, w, 3) uint8 array."""
    if frames.ndim != 4 or frames.shape[0] != 3:
        raise ValueError(f"expected frames of shape (3, f, h, w), got {tuple(frames.shape)}")
    if frames.shape[1] == 0:
        raise ValueError("cannot save a video with zero frames")
    as_uint8 = frames.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return as_uint8.permute(1, 2, 3, 0).cpu().numpy()


def save_video(
    frames: torch.Tensor,
    path: str | os.PathLike,
    fps: float = 8,
    overwrite: bool = False,
    loop: int = 0,
    metadata: str | None = None,
) -> Path:
    """Save a (3, f, h, w) float video in [0, 1] to ``path``; the format follows the suffix.

    - ``.gif``: animated GIF via Pillow; ``loop=0`` loops forever, ``loop=n`` repeats n times.
    - ``.mp4``: H.264 (yuv420p, crf 18) via PyAV. yuv420p needs even width and height, so an
      odd dimension is padded by one pixel that replicates the last row/column.
    - ``.webp``: animated lossy WebP (quality 90) via Pillow, looping like GIF.
    - no suffix, or an existing directory: a folder of ``frame_00000.png``, ``frame_00001.png``...

    Parent directories are created. An existing target raises ``FileExistsError`` unless
    ``overwrite`` is true, in which case it is replaced as a whole (folders included); a
    target that appears while encoding is not replaced either. ``metadata`` is text embedded
    in the file (see the module docstring). Returns the path written.
    """
    path = Path(path)
    fmt = _format_for(path)
    _check_target(path, overwrite)
    _write(to_uint8_frames(frames), path, fmt, fps, loop, metadata, overwrite)
    return path


def _format_for(path: Path) -> str:
    if path.is_dir() or path.suffix == "":
        return PNG_FOLDER
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        supported = ", ".join(SUPPORTED_SUFFIXES)
        raise ValueError(
            f"unsupported video suffix {path.suffix!r} for {path}; "
            f"use one of {supported}, or no suffix for a folder of PNG frames"
        )
    return suffix.lstrip(".")


def _check_target(path: Path, overwrite: bool) -> None:
    if not overwrite and (path.exists() or path.is_symlink()):
        raise FileExistsError(
            f"{path} already exists; pass overwrite=True (or --overwrite on the CLI) to replace it"
        )


@contextmanager
def encoded(
    frames: torch.Tensor,
    path: str | os.PathLike,
    fps: float = 8,
    loop: int = 0,
    metadata: str | None = None,
) -> Iterator[Path]:
    """Encode a (3, f, h, w) video as :func:`save_video` would for ``path``, into a hidden
    temporary beside it; yield that temporary, to put in place with `video.files.claim`
    (under ``path`` or another name of the same format and folder). It is removed on exit."""
    path = Path(path)
    fmt = _format_for(path)
    arr = to_uint8_frames(frames)
    with staged(path, is_dir=fmt == PNG_FOLDER) as tmp:
        _encode(arr, tmp, fmt, fps, loop, metadata)
        yield tmp


def _write(
    arr: np.ndarray,
    path: Path,
    fmt: str,
    fps: float,
    loop: int,
    metadata: str | None = None,
    overwrite: bool = False,
) -> None:
    with new_path(path, overwrite, is_dir=fmt == PNG_FOLDER) as tmp:
        _encode(arr, tmp, fmt, fps, loop, metadata)


def _encode(arr: np.ndarray, tmp: Path, fmt: str, fps: float, loop: int, metadata) -> None:
    if not 0 < fps < float("inf"):
        raise ValueError(f"fps must be positive and finite, got {fps}")
    writers: dict[str, Callable[[np.ndarray, Path, float, int, str | None], None]] = {
        "gif": _write_gif,
        "mp4": _write_mp4,
        "webp": _write_webp,
        PNG_FOLDER: _write_png_folder,
    }
    writers[fmt](arr, tmp, fps, loop, metadata)


# --- format writers -------------------------------------------------------------------------


def _frame_ms(fps: float) -> int:
    return max(1, round(1000 / fps))


def _write_gif(arr: np.ndarray, path: Path, fps: float, loop: int, metadata: str | None) -> None:
    images = [Image.fromarray(frame) for frame in arr]
    # disposal=2 clears each frame before the next, so palette-reduced frames never smear.
    images[0].save(
        path,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=_frame_ms(fps),
        loop=loop,
        disposal=2,
        optimize=False,
        **meta.gif_arguments(metadata),
    )


def _write_webp(arr: np.ndarray, path: Path, fps: float, loop: int, metadata: str | None) -> None:
    images = [Image.fromarray(frame) for frame in arr]
    images[0].save(
        path,
        format="WEBP",
        save_all=True,
        append_images=images[1:],
        duration=_frame_ms(fps),
        loop=loop,
        lossless=False,
        quality=WEBP_QUALITY,
        **meta.webp_arguments(metadata),
    )


def _write_png_folder(
    arr: np.ndarray, folder: Path, fps: float, loop: int, metadata: str | None
) -> None:
    extra = meta.png_arguments(metadata)
    for i, frame in enumerate(arr):
        Image.fromarray(frame).save(folder / f"frame_{i:05d}.png", format="PNG", **extra)


def pad_to_even(arr: np.ndarray) -> np.ndarray:
    """Pad (f, h, w, c) frames to even h and w by replicating the last row/column."""
    h, w = arr.shape[1:3]
    if h % 2 == 0 and w % 2 == 0:
        return arr
    return np.pad(arr, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), mode="edge")


def _write_mp4(arr: np.ndarray, path: Path, fps: float, loop: int, metadata: str | None) -> None:
    arr = pad_to_even(arr)
    # format= is explicit because the temporary file name does not end in .mp4.
    with av.open(str(path), mode="w", format="mp4") as container:
        container.metadata.update(meta.mp4_tags(metadata))
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.height, stream.width = arr.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(MP4_CRF)}
        for frame in arr:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())  # flush delayed frames


# --- batched videos -------------------------------------------------------------------------


@dataclass
class Video:
    """A batch of videos: ``frames`` is (b, 3, f, h, w) float in [0, 1]."""

    frames: torch.Tensor
    fps: float = 8
    # How the videos were made (prompt, seed, settings), for reproducing them.
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.frames.ndim != 5 or self.frames.shape[1] != 3:
            raise ValueError(f"expected frames (b, 3, f, h, w), got {tuple(self.frames.shape)}")

    @property
    def batch_size(self) -> int:
        return self.frames.shape[0]

    @property
    def num_frames(self) -> int:
        return self.frames.shape[2]

    @property
    def height(self) -> int:
        return self.frames.shape[3]

    @property
    def width(self) -> int:
        return self.frames.shape[4]

    def save(
        self,
        path: str | os.PathLike,
        fps: float | None = None,
        overwrite: bool = False,
        metadata: str | None = None,
    ) -> list[Path]:
        """Save every video; see :func:`save_video` for formats.

        With one video it goes to ``path``. With several, video ``i`` goes beside ``path`` as
        ``<stem>-<i><suffix>`` (``out.gif`` -> ``out-0.gif``, ``out-1.gif``); a PNG folder
        ``out`` becomes ``out-0``, ``out-1``. All targets are checked before anything is written.
        """
        path = Path(path)
        fmt = _format_for(path)
        targets = [path] if self.batch_size == 1 else self._indexed(path, fmt)
        for target in targets:
            _check_target(target, overwrite)
        for video, target in zip(self.frames, targets, strict=True):
            rate = self.fps if fps is None else fps
            _write(to_uint8_frames(video), target, fmt, rate, 0, metadata, overwrite)
        return targets

    def _indexed(self, path: Path, fmt: str) -> list[Path]:
        if fmt == PNG_FOLDER:  # whole name, so an existing folder "a.b" gives "a.b-0"
            return [path.with_name(f"{path.name}-{i}") for i in range(self.batch_size)]
        return [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(self.batch_size)]

    def to_pil(self, index: int = 0) -> list[Image.Image]:
        """Frames of video ``index`` as RGB PIL images."""
        return [Image.fromarray(frame) for frame in to_uint8_frames(self.frames[index])]
