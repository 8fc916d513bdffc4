"""Where `animatediff generate` writes, decided and checked before any model loads.

Each video gets a `Slot`: a path and whether another name may be taken if that one is claimed
first. Default names (`outputs/<time to the microsecond>-<prompt>-<seed>.gif`) may: a run that
finds its name taken when it saves takes `-1`, `-2`... instead. Names the user gave (`-o`, the
files in a `--config` folder given with `-o`) may not: an existing one is an error before
sampling (unless `--overwrite` or `--skip-existing`), and one that another animatediff run is
making is reserved by it (a lock under `$ANIMATEDIFF_CACHE/locks`, freed when that run ends,
taken over if its process died), so the second run stops at once instead of after sampling.
Nothing here ever replaces a file: `video.files.claim` puts each one in place.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError
from ..options import OUTPUT_SUFFIXES
from ..processes import process_alive
from .config import Run

log = logging.getLogger("animatediff")
MAX_RENAMES = 1000
GRID_NAME = "sample.gif"  # as the official script names its grid of a config's videos
CONFIG_COPY = "config.yaml"


@dataclass(frozen=True)
class Slot:
    """Where one video goes: `path`, or (if `renamable`) the first free of `path-1`..."""

    path: Path
    renamable: bool

    def candidates(self) -> Iterator[Path]:
        yield self.path
        if self.renamable:
            stem, suffix = _split(self.path)
            for i in range(1, MAX_RENAMES):
                yield self.path.with_name(f"{stem}-{i}{suffix}")


def _split(path: Path) -> tuple[str, str]:
    suffix = path.suffix if path.suffix.lower() in OUTPUT_SUFFIXES else ""
    return path.name[: len(path.name) - len(suffix)], suffix


def settings_path(path: Path) -> Path:
    """The settings JSON beside a video: `out.gif` -> `out.gif.json`."""
    return path.parent / f"{path.name}.json"


def stamp() -> str:
    """Local time to the microsecond, for default names."""
    now = time.time()
    return time.strftime("%Y%m%d-%H%M%S", time.localtime(now)) + f"-{int(now % 1 * 1e6):06d}"


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].lower() or "video"


def indexed(path: Path, i: int) -> Path:
    """Video `i` of several named by one `-o`: `out.gif` -> `out-0.gif`, folder `f` -> `f-0`."""
    stem, suffix = _split(path)
    return path.with_name(f"{stem}-{i}{suffix}")


# -- the plan: where each video goes ----------------------------------------------------------------
def outputs_for(args, runs: list[Run]) -> list[list[Slot]]:
    """Where each video of each run goes (one slot per video), suffixes checked."""
    when = stamp()
    if args.output == "":
        raise UsageError("-o: an empty path")
    if args.output:
        check_suffix(Path(args.output))
    if args.config is not None:
        folder = Path(args.output or Path("outputs") / f"{Path(args.config).stem}-{when}")
        names = [f"{i:03d}-{slug(_title(r.prompt))}" for i, r in enumerate(runs)]
        return [
            _slots(folder / f"{n}.gif", r, renamable=not args.output) for n, r in zip(names, runs)
        ]
    (run,) = runs
    name = args.prompt or (
        _title(run.prompt) if args.replay is not None else Path(args.prompt_map).stem
    )
    sampling = run.options().sampling
    seed, videos = sampling.seed, sampling.num_videos_per_prompt
    defaults = [f"{when}-{slug(name)}-{seed + i}.gif" for i in range(videos)]
    out = Path(args.output) if args.output else None
    if out is None or out.is_dir():
        folder = out or Path("outputs")
        return [[Slot(folder / d, renamable=True) for d in defaults]]
    return [_slots(out, run, renamable=False)]


def _slots(path: Path, run: Run, renamable: bool) -> list[Slot]:
    videos = run.options().sampling.num_videos_per_prompt
    paths = [path] if videos == 1 else [indexed(path, i) for i in range(videos)]
    return [Slot(p, renamable) for p in paths]


def _title(prompt: str | dict) -> str:
    return prompt if isinstance(prompt, str) else str(next(iter(prompt.values()), ""))


def slots_free(job_slots: list[list[Slot]], args, reservations: Reservations) -> list[bool]:
    """Which runs to make: names the user gave must be free (or --overwrite), and are
    reserved; with --skip-existing a run whose names exist or are reserved is skipped."""
    make = []
    for slots in job_slots:
        fixed = [s.path for s in slots if not s.renamable]
        busy = [p for p in fixed if taken(p) or reservations.holder(p) is not None]
        if busy and args.skip_existing:
            log.info("skipping %s: it exists or is being made", busy[0])
            make.append(False)
            continue
        if busy and not args.overwrite:
            pid = reservations.holder(busy[0])
            if pid is not None:
                raise UsageError(f"{busy[0]} is being made by another animatediff run (pid {pid})")
            raise UsageError(f"{busy[0]} already exists; pass --overwrite to replace it")
        for path in fixed:
            reservations.reserve(path)
        make.append(True)
    return make


def check_folders(job_slots: list[list[Slot]]) -> None:
    for folder in sorted({s.path.parent for slots in job_slots for s in slots}):
        check_writable(folder)


def extras_free(folder: Path, args) -> None:
    """A config batch's grid and config copy, in a folder the user named."""
    if not args.output or args.overwrite or args.skip_existing:
        return
    for name in (GRID_NAME, CONFIG_COPY):
        if (folder / name).exists():
            raise UsageError(f"{folder / name} already exists; pass --overwrite to replace it")


# -- checks before sampling ------------------------------------------------------------------------
def check_suffix(path: Path) -> None:
    if path.suffix and path.suffix.lower() not in OUTPUT_SUFFIXES and not path.is_dir():
        raise UsageError(
            f"-o {path}: unsupported suffix {path.suffix!r}; use {', '.join(OUTPUT_SUFFIXES)} "
            "or a folder name for PNG frames"
        )


def taken(path: Path) -> bool:
    return any(p.exists() or p.is_symlink() for p in (path, settings_path(path)))


def check_writable(folder: Path, flag: str = "-o") -> None:
    """The nearest existing folder above `folder` must be a folder we can create files in:
    found by creating (and removing) a probe file, which no permission bits can fool."""
    existing = folder
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{flag} {folder}: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=".animatediff-probe-", dir=existing)
    except OSError as e:
        raise UsageError(f"{flag} {folder}: cannot write in {existing} ({e.strerror})") from None
    os.close(fd)
    os.unlink(probe)


# -- reservations: one animatediff run per output name -------------------------------------------
def locks_dir() -> Path:
    root = os.environ.get("ANIMATEDIFF_CACHE") or Path.home() / ".cache" / "animatediff"
    return Path(root) / "locks"


class Reservations:
    """Lock files for the output names this run will write; `close()` frees them."""

    def __init__(self) -> None:
        self.files: list[Path] = []

    def holder(self, path: Path) -> int | None:
        """The pid of another live run reserving `path`, else None (a stale lock is removed)."""
        lock = _lock_file(path)
        try:
            pid = int(lock.read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        if pid != os.getpid() and process_alive(pid):
            return pid
        lock.unlink(missing_ok=True)  # left by a run that died
        return None

    def reserve(self, path: Path) -> None:
        """Reserve `path` for this run; UsageError if another live run holds it."""
        lock = _lock_file(path)
        for _ in range(2):
            try:
                lock.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                pid = self.holder(path)
                if pid is not None:
                    raise UsageError(
                        f"{path} is being made by another animatediff run (pid {pid})"
                    ) from None
                continue
            except OSError:
                return  # no place for locks: the claim at the end still never replaces
            with os.fdopen(fd, "w") as f:
                f.write(f"{os.getpid()}\n")
            self.files.append(lock)
            return

    def close(self) -> None:
        for lock in self.files:
            lock.unlink(missing_ok=True)
        self.files.clear()


def _lock_file(path: Path) -> Path:
    key = hashlib.sha256(os.fsencode(path.resolve())).hexdigest()[:32]
    return locks_dir() / f"{key}.lock"
