"""Settings embedded in the videos themselves, so a video alone says how it was made and
`animatediff generate --from VIDEO` remakes it. Torch-free (the command line reads settings
in its light half); `animatediff.video` re-exports `read_settings`.

Where the text goes, by format (each the format's own place for free text, read by common tools):
- GIF: a comment extension (Pillow `comment`);
- WebP: an XMP packet, the text in an `animatediff:settings` element (Pillow `xmp`);
- MP4: the container's `comment` tag (ffmpeg's `©cmt` atom; PyAV `metadata`);
- PNG frames: an `animatediff` iTXt chunk in every frame (Pillow `PngInfo`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any
from xml.etree import ElementTree
from xml.sax.saxutils import escape

import av
from PIL import Image, PngImagePlugin, UnidentifiedImageError

from .errors import UserError

__all__ = ["KEY", "SettingsReadError", "read_embedded", "read_settings"]

KEY = "animatediff"  # PNG text key, and the XMP namespace prefix
XMP_NS = "https://github.com/guoyww/AnimateDiff#settings"
_XMP = (
    '<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF '
    'xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#"><rdf:Description '
    'xmlns:animatediff="{ns}"><animatediff:settings>{text}</animatediff:settings>'
    "</rdf:Description></rdf:RDF></x:xmpmeta>"
)


class SettingsReadError(UserError):
    """A file that holds no readable animatediff settings."""


# -- writing: keyword arguments for the writers ------------------------------------------------
def gif_arguments(text: str | None) -> dict[str, Any]:
    return {} if text is None else {"comment": text.encode("utf-8")}


def webp_arguments(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    return {"xmp": _XMP.format(ns=XMP_NS, text=escape(text)).encode("utf-8")}


def png_arguments(text: str | None) -> dict[str, Any]:
    if text is None:
        return {}
    info = PngImagePlugin.PngInfo()
    info.add_itxt(KEY, text)
    return {"pnginfo": info}


def mp4_tags(text: str | None) -> dict[str, str]:
    return {} if text is None else {"comment": text}


# -- reading -----------------------------------------------------------------------------------
def read_embedded(path: str | os.PathLike) -> str | None:
    """The text embedded in a video written by this package (GIF, WebP, MP4, a PNG frame or a
    folder of them), or None if it holds none. Unreadable files raise SettingsReadError."""
    path = Path(path)
    try:
        if path.is_dir():
            frames = sorted(path.glob("*.png"))
            return _png_text(frames[0]) if frames else None
        suffix = path.suffix.lower()
        if suffix == ".png":
            return _png_text(path)
        if suffix == ".gif":
            return _decoded(_pillow_info(path).get("comment"))
        if suffix == ".webp":
            return _from_xmp(_pillow_info(path).get("xmp"))
        with av.open(str(path)) as container:
            return container.metadata.get("comment")
    except (OSError, UnidentifiedImageError, av.FFmpegError, ValueError) as e:
        raise SettingsReadError(f"{path}: cannot read its metadata ({e})") from None


def read_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The settings a video was made with: from a settings JSON (written beside every output),
    or embedded in the video itself. Raises SettingsReadError when there are none."""
    path = Path(path)
    if not path.exists():
        raise SettingsReadError(f"{path}: not found")
    if path.suffix.lower() == ".json":
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise SettingsReadError(f"{path}: cannot read it ({e})") from None
    else:
        text = read_embedded(path)
        if text is None:
            raise SettingsReadError(f"{path}: holds no animatediff settings")
    try:
        data = json.loads(text)
    except ValueError as e:
        raise SettingsReadError(f"{path}: settings are not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise SettingsReadError(f"{path}: settings are not a JSON object")
    return data


def _pillow_info(path: Path) -> dict:
    with Image.open(path) as image:
        return dict(image.info)


def _png_text(path: Path) -> str | None:
    with Image.open(path) as image:
        image.load()  # text chunks after the image data are read with it
        return getattr(image, "text", {}).get(KEY)


def _decoded(value: bytes | str | None) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return value.decode("utf-8", errors="strict")


def _from_xmp(value: bytes | str | None) -> str | None:
    if not value:
        return None
    root = ElementTree.fromstring(_decoded(value))
    element = root.find(f".//{{{XMP_NS}}}settings")
    return None if element is None else element.text
