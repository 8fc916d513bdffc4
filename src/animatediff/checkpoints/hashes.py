"""SHA-256 of the model files a video was made with, for its settings file.

A large checkpoint takes seconds to hash, so digests are cached by (path, size, mtime) in
`$ANIMATEDIFF_CACHE/hashes.json` (default `~/.cache/animatediff`): each file is read once.
A file in huggingface_hub's cache is a link to a blob named by its SHA-256 (LFS files, checked
when downloaded), so that name is used directly. A folder's digest is the SHA-256 of the list
`relative/path digest` of its files, sorted (hidden files left out). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

__all__ = ["cache_file", "sha256"]

_BLOB = re.compile(r"[0-9a-f]{64}")
_CHUNK = 1 << 20


def cache_file() -> Path:
    root = os.environ.get("ANIMATEDIFF_CACHE") or Path.home() / ".cache" / "animatediff"
    return Path(root) / "hashes.json"


def sha256(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file, or of a folder's files (see the module docstring)."""
    path = Path(path)
    cache = _load()
    digest = _folder(path, cache) if path.is_dir() else _file(path, cache)
    _save(cache)
    return digest


def _folder(path: Path, cache: dict) -> str:
    lines = []
    for file in sorted(path.rglob("*")):
        rel = file.relative_to(path)
        if file.is_file() and not any(part.startswith(".") for part in rel.parts):
            lines.append(f"{rel.as_posix()} {_file(file, cache)}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def _file(path: Path, cache: dict) -> str:
    real = path.resolve()
    if real.parent.name == "blobs" and _BLOB.fullmatch(real.name):
        return real.name  # huggingface_hub's cache: the blob is named by its SHA-256
    stat = real.stat()
    key = str(real)
    stamp = [stat.st_size, stat.st_mtime_ns]
    entry = cache.get(key)
    if isinstance(entry, dict) and entry.get("stamp") == stamp:
        return entry["sha256"]
    h = hashlib.sha256()
    with real.open("rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    cache[key] = {"stamp": stamp, "sha256": h.hexdigest()}
    cache["_changed"] = True
    return h.hexdigest()


def _load() -> dict:
    try:
        data = json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _save(cache: dict) -> None:
    """Written whole (a temporary, then a rename); a cache that cannot be written is skipped."""
    if not cache.pop("_changed", False):
        return
    file = cache_file()
    fresh = _load()  # keep what other processes added meanwhile
    fresh.update(cache)
    fresh = {k: v for k, v in fresh.items() if os.path.exists(k)}  # forget deleted files
    tmp = file.with_name(f".{file.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(fresh))
        os.replace(tmp, file)
    except OSError:
        tmp.unlink(missing_ok=True)
