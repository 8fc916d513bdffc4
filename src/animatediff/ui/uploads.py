"""Uploaded images and videos: size-limited, checked by decoding their content, and stored
under generated names in the result's folder (the pipeline and the command read the copies)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from PIL import Image, UnidentifiedImageError

from ..video import VideoReadError, read_video
from .jobs import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
VIDEO_SUFFIXES = (".mp4", ".webm", ".mov", ".mkv", ".avi", ".gif")
MAX_SIDE = 4096  # pixels: larger images are refused before they are decoded
DEFAULT_LIMIT = 50 * 2**20


def check_size(path: str | os.PathLike, what: str, limit: int = DEFAULT_LIMIT) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what}: the upload is missing; upload it again")
    size = path.stat().st_size
    if size > limit:
        raise UserError(f"{what}: {size / 2**20:.1f} MiB is over the {limit / 2**20:.0f} MiB limit")
    return path


def store_image(src: str | os.PathLike, dest: Path, what: str, limit: int = DEFAULT_LIMIT) -> str:
    """Decode an uploaded image and write it as `dest` (PNG); UserError if it is not one."""
    path = check_size(src, what, limit)
    try:
        with Image.open(path) as image:
            if max(image.size) > MAX_SIDE:
                raise UserError(f"{what}: {image.width}x{image.height} is larger than {MAX_SIDE}")
            image.load()
            rgb = image.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError) as e:
        raise UserError(f"{what}: not a readable image ({_reason(e)})") from None
    tmp = dest.with_name(f".{dest.name}.tmp")
    rgb.save(tmp, format="PNG")
    os.replace(tmp, dest)
    return str(dest)


def store_video(src: str | os.PathLike, dest: Path, what: str, limit: int = DEFAULT_LIMIT) -> str:
    """Check an uploaded video (known type, decodable frame) and copy it to `dest` plus its
    suffix; returns the stored path."""
    path = check_size(src, what, limit)
    suffix = path.suffix.lower()
    if suffix not in VIDEO_SUFFIXES:
        allowed = " ".join(VIDEO_SUFFIXES)
        raise UserError(f"{what}: {suffix or 'no suffix'} is not a video type ({allowed})")
    try:
        first = read_video(path, num_frames=1)
    except (VideoReadError, OSError, ValueError) as e:
        raise UserError(f"{what}: not a readable video ({_reason(e)})") from None
    if max(first.shape[-2:]) > MAX_SIDE:
        raise UserError(f"{what}: frames larger than {MAX_SIDE} pixels")
    target = dest.with_suffix(suffix)
    tmp = target.with_name(f".{target.name}.tmp")
    shutil.copyfile(path, tmp)
    os.replace(tmp, target)
    return str(target)


def store_frames(src: str | os.PathLike, dest: Path, what: str, limit: int = DEFAULT_LIMIT) -> str:
    """An image or a video, by its suffix (each then checked by its content)."""
    if Path(src).suffix.lower() in IMAGE_SUFFIXES:
        return store_image(src, dest.with_suffix(".png"), what, limit)
    return store_video(src, dest, what, limit)


def _reason(error: Exception) -> str:
    """The cause without the server's temporary path in it."""
    text = " ".join(str(error).split())
    return text.rsplit(": ", 1)[-1][:200] if text else type(error).__name__
