"""Files written whole or not at all, and never over another's.

Content is written under a hidden temporary name beside the target, then put in place in one
step: with `overwrite`, an atomic rename over whatever is there; without, a *claim* that fails
if the name exists (a hard link for files, `mkdir` then rename for folders), so two runs that
pick the same name can never replace each other's result: the second gets FileExistsError.
A failed or interrupted write removes its temporary; one left by a process killed with SIGKILL
(hidden, `.NAME.PID.*.tmp`) is removed by the next write of that name.
"""

from __future__ import annotations

import glob
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from ..processes import process_alive

__all__ = [
    "claim",
    "new_path",
    "process_alive",
    "remove",
    "remove_stale",
    "sibling",
    "staged",
    "write_text",
]


def sibling(path: Path, tag: str) -> Path:
    """A hidden, unique name in `path`'s folder (same filesystem, so renames are atomic)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.{tag}")


@contextmanager
def staged(path: str | os.PathLike, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path beside `path` (a new folder if `is_dir`) to write and then
    :func:`claim`; whatever is left of it is removed on exit, failure or not."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale(path)
    tmp = sibling(path, "tmp")
    if is_dir:
        tmp.mkdir()
    try:
        yield tmp
    finally:
        remove(tmp)


@contextmanager
def new_path(path: str | os.PathLike, overwrite: bool, is_dir: bool = False) -> Iterator[Path]:
    """Yield a temporary path to write (a folder if `is_dir`); once the block succeeds it
    becomes `path` (see :func:`claim`); on any failure `path` is untouched."""
    with staged(path, is_dir) as tmp:
        yield tmp
        claim(tmp, Path(path), overwrite)


def claim(tmp: Path, path: Path, overwrite: bool) -> None:
    """Put the finished `tmp` at `path`. Without `overwrite`, only if `path` does not exist
    at that instant: FileExistsError otherwise, and `tmp` is still there to claim another
    name with. (A claimed file may stay linked at `tmp`: :func:`staged` removes it.)"""
    if overwrite:
        _replace(tmp, path)
    elif tmp.is_dir():
        try:
            os.mkdir(path)  # the claim: fails if the name exists
        except FileExistsError:
            raise _taken(path) from None
        try:
            os.replace(tmp, path)  # a folder may replace the empty folder we just made
        except OSError:
            os.rmdir(path)
            raise
    else:
        _link(tmp, path)


def _link(tmp: Path, path: Path) -> None:
    try:
        os.link(tmp, path)  # atomic, and refuses an existing name
    except FileExistsError:
        raise _taken(path) from None
    except OSError:  # a filesystem without hard links: claim the name empty, then fill it
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
        os.close(fd)
        os.replace(tmp, path)


def _taken(path: Path) -> FileExistsError:
    error = FileExistsError(f"{path} already exists (it appeared while this was being written)")
    error.filename = str(path)
    return error


def _replace(tmp: Path, path: Path) -> None:
    free = not path.exists() and not path.is_symlink()
    folder_there = path.is_dir() and not path.is_symlink()
    if free or (not folder_there and not tmp.is_dir()):
        os.replace(tmp, path)  # atomic file-over-file (or into a free name)
        return
    # os.replace cannot put a folder over a non-empty folder or a file: move the old one aside
    # first and restore it if the final rename fails.
    old = sibling(path, "old")
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    remove(old)


def remove_stale(path: Path) -> None:
    """Remove temporaries for `path` left by processes that no longer exist (killed with
    SIGKILL, the one signal that leaves no time to clean up)."""
    for tmp in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        pid = tmp.name[len(path.name) + 2 :].split(".")[0]
        if pid.isdigit() and not process_alive(int(pid)):
            remove(tmp)


def remove(path: Path) -> None:
    """Delete a file or folder if it exists."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str, overwrite: bool = False) -> Path:
    """Write a UTF-8 text file whole, claiming the name unless `overwrite`."""
    with new_path(path, overwrite) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
