"""Read videos (files via PyAV, GIF/WebP/images via Pillow, folders of images) as tensors."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..errors import UserError

__all__ = [
    "VideoInfo",
    "VideoReadError",
    "read_frames_as_tensor",
    "read_video",
    "resize_center_crop",
    "video_info",
]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg"})
PILLOW_SUFFIXES = frozenset({".gif", ".webp"}) | IMAGE_SUFFIXES
DEFAULT_FPS = 8.0  # used when the source has no timing (image folders, zero GIF durations)

# A frame source yields thunks, so frames that are skipped are never converted to arrays.
# A thunk must be called before the iterator advances (Pillow reuses one image object).
FrameThunk = Callable[[], np.ndarray]


class VideoReadError(UserError):
    """A video could not be read, or has fewer frames than requested."""


@dataclass(frozen=True)
class VideoInfo:
    num_frames: int
    fps: float
    width: int
    height: int


# --- public API -----------------------------------------------------------------------------


def video_info(path: str | os.PathLike) -> VideoInfo:
    """Frame count, frame rate and size of a video file, GIF/WebP or folder of images."""
    path = _existing(path)
    with _reading(path):
        if path.is_dir():
            return _folder_info(path)
        if path.suffix.lower() in PILLOW_SUFFIXES:
            return _pillow_info(path)
        return _pyav_info(path)


def read_video(
    path: str | os.PathLike,
    start: int = 0,
    num_frames: int | None = None,
    stride: int = 1,
    size: tuple[int, int] | None = None,
) -> torch.Tensor:
    """Read frames ``start, start + stride, ...`` as a (3, f, h, w) float tensor in [0, 1].

    Reads ``num_frames`` frames (``VideoReadError`` if the video is too short) or, when it is
    None, every frame from ``start`` on. Decoding stops once the needed frames are read.
    ``size=(width, height)`` resizes keeping the aspect ratio, then centre-crops to that size.
    """
    _check_selection(start, num_frames, stride)
    path = _existing(path)
    with _reading(path), _frame_source(path) as thunks:
        arrays, seen = _select(thunks, start, num_frames, stride)
    if not arrays or (num_frames is not None and len(arrays) < num_frames):
        wanted = "at least one frame" if num_frames is None else f"{num_frames} frames"
        raise VideoReadError(
            f"{path}: need {wanted} from frame {start} with stride {stride}, "
            f"but the video has only {seen} frames"
        )
    video = _stack(arrays, path)
    return video if size is None else resize_center_crop(video, size)


def read_frames_as_tensor(images: list[Image.Image]) -> torch.Tensor:
    """Stack same-size PIL images into a (3, f, h, w) float tensor in [0, 1]."""
    if not images:
        raise ValueError("no images given")
    return _stack([np.asarray(image.convert("RGB")) for image in images], "images")


def resize_center_crop(video: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a (3, f, h, w) video to cover ``size=(width, height)``, then centre-crop to it."""
    width, height = size
    if width <= 0 or height <= 0:
        raise ValueError(f"size must be positive (width, height), got {size}")
    h, w = video.shape[-2:]
    scale = max(width / w, height / h)
    # max() guards against rounding the covering side just below the target.
    new_h, new_w = max(height, round(h * scale)), max(width, round(w * scale))
    if (new_h, new_w) != (h, w):
        frames = video.transpose(0, 1)  # interpolate wants (batch, channels, h, w)
        frames = F.interpolate(
            frames, size=(new_h, new_w), mode="bilinear", antialias=True, align_corners=False
        )
        video = frames.transpose(0, 1).clamp(0, 1)
    top, left = (new_h - height) // 2, (new_w - width) // 2
    return video[..., top : top + height, left : left + width].contiguous()


# --- selection and conversion ---------------------------------------------------------------


def _check_selection(start: int, num_frames: int | None, stride: int) -> None:
    if start < 0:
        raise ValueError(f"start must be >= 0, got {start}")
    if stride < 1:
        raise ValueError(f"stride must be >= 1, got {stride}")
    if num_frames is not None and num_frames < 1:
        raise ValueError(f"num_frames must be >= 1 or None, got {num_frames}")


def _select(
    thunks: Iterator[FrameThunk], start: int, num_frames: int | None, stride: int
) -> tuple[list[np.ndarray], int]:
    """Pick the wanted frames; also return how many frames were seen (all, if too few)."""
    picked: list[np.ndarray] = []
    seen = 0
    for index, thunk in enumerate(thunks):
        seen = index + 1
        if index >= start and (index - start) % stride == 0:
            picked.append(thunk())
            if len(picked) == num_frames:
                break
    return picked, seen


def _stack(arrays: list[np.ndarray], source: object) -> torch.Tensor:
    shapes = {array.shape for array in arrays}
    if len(shapes) > 1:
        raise VideoReadError(f"{source}: frames differ in size: {sorted(shapes)}")
    video = torch.from_numpy(np.stack(arrays))  # (f, h, w, 3) uint8
    return video.permute(3, 0, 1, 2).float().div(255)


# --- opening sources ------------------------------------------------------------------------


def _existing(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no such video file or folder: {path}")
    return path


@contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Turn decoder errors into ``VideoReadError`` naming the file."""
    try:
        yield
    except VideoReadError:
        raise
    except (av.FFmpegError, UnidentifiedImageError, OSError, EOFError, SyntaxError) as error:
        raise VideoReadError(f"{path}: not a readable video ({error})") from error


@contextmanager
def _frame_source(path: Path) -> Iterator[Iterator[FrameThunk]]:
    if path.is_dir():
        yield _folder_frames(path)
    elif path.suffix.lower() in PILLOW_SUFFIXES:
        with Image.open(path) as image:
            yield _pillow_frames(image)
    else:
        with av.open(str(path)) as container:
            yield _pyav_frames(container, _video_stream(container, path))


def _video_stream(container: av.container.InputContainer, path: Path) -> av.VideoStream:
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame-threaded decoding; safe to stop early
    return stream


def _pyav_frames(
    container: av.container.InputContainer, stream: av.VideoStream
) -> Iterator[FrameThunk]:
    for frame in container.decode(stream):
        yield lambda frame=frame: frame.to_ndarray(format="rgb24")


def _pillow_frames(image: Image.Image) -> Iterator[FrameThunk]:
    for index in range(getattr(image, "n_frames", 1)):
        image.seek(index)
        yield lambda: np.asarray(image.convert("RGB"))


def _image_files(folder: Path) -> list[Path]:
    files = [p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
    if not files:
        raise VideoReadError(f"{folder}: folder contains no PNG/JPG images")
    # Natural order, so frame_2.png comes before frame_10.png even without zero padding.
    return sorted(
        files, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", p.name)]
    )


def _folder_frames(folder: Path) -> Iterator[FrameThunk]:
    for file in _image_files(folder):
        yield lambda file=file: _load_rgb(file)


def _load_rgb(file: Path) -> np.ndarray:
    with Image.open(file) as image:
        return np.asarray(image.convert("RGB"))


# --- info -----------------------------------------------------------------------------------


def _pyav_info(path: Path) -> VideoInfo:
    with av.open(str(path)) as container:
        stream = _video_stream(container, path)
        rate = stream.average_rate or stream.guessed_rate
        width, height = stream.codec_context.width, stream.codec_context.height
        # Some containers do not state a frame count; count by decoding instead.
        count = stream.frames or sum(1 for _ in container.decode(stream))
    return VideoInfo(count, float(rate) if rate else DEFAULT_FPS, width, height)


def _pillow_info(path: Path) -> VideoInfo:
    with Image.open(path) as image:
        image.load()  # WebP only reports the first frame's duration once it is decoded
        duration_ms = image.info.get("duration") or 0
        fps = 1000 / duration_ms if duration_ms > 0 else DEFAULT_FPS
        return VideoInfo(getattr(image, "n_frames", 1), fps, image.width, image.height)


def _folder_info(folder: Path) -> VideoInfo:
    files = _image_files(folder)
    with Image.open(files[0]) as image:
        return VideoInfo(len(files), DEFAULT_FPS, image.width, image.height)
