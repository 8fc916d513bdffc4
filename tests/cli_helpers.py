"""Running the `animatediff` command in this process (`cli.main.main(argv)` returns the exit
code), and what every run must satisfy: exit 0 or 2, no traceback, one line per mistake."""

from __future__ import annotations

import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from animatediff.cli.main import main

# tqdm redraws its bar with carriage returns; these are not messages
_PROGRESS = re.compile(r"(it/s\]|s/it\]|\d+%\|)")


@dataclass
class Result:
    code: int
    out: str
    err: str

    @property
    def messages(self) -> list[str]:
        """stderr lines that are messages, not progress bars."""
        lines = re.split(r"[\r\n]+", self.err)
        return [line for line in lines if line.strip() and not _PROGRESS.search(line)]

    def saved(self) -> list[Path]:
        return [Path(line[6:]) for line in self.out.splitlines() if line.startswith("saved ")]

    def __str__(self) -> str:
        return f"exit {self.code}\n--- stdout\n{self.out}\n--- stderr\n{self.err}"


def run_cli(capsys: pytest.CaptureFixture, *args: object) -> Result:
    capsys.readouterr()  # drop what came before
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return Result(code, out, err)


def assert_ok(result: Result) -> None:
    assert result.code == 0, result
    assert "Traceback" not in result.err, result


def assert_error(result: Result, *needles: str) -> str:
    """Exit 2 and exactly one `animatediff: error:` line (warnings may precede it), naming
    every needle; no traceback."""
    assert result.code == 2, result
    assert "Traceback" not in result.err, result
    errors = [m for m in result.messages if m.startswith("animatediff: error: ")]
    assert len(errors) == 1, result
    assert result.messages[-1] == errors[0], result
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def listing(folder: Path) -> dict[str, tuple[int, int]]:
    """Every file under `folder` (hidden ones too) with its size and modification time."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


class RunsShell:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def write_evil(path: Path, marker: Path) -> Path:
    """A torch checkpoint holding a tensor and an object whose unpickling runs code."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"weight": torch.zeros(2), "evil": RunsShell(marker)}, path)
    return path


def write_evil_legacy(path: Path, marker: Path) -> Path:
    """The same as a plain (non-zip) pickle."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump({"weight": torch.zeros(2), "evil": RunsShell(marker)}, f, protocol=2)
    return path


# The heavy half's stand-in for tests of the light half alone: it takes the checked job and
# renders nothing (`monkeypatch.setitem(main.HEAVY, "generate", LIGHT_ONLY)`).
LIGHT_ONLY = ("cli_helpers", "accept")
accepted: list = []


def accept(job) -> None:
    accepted.append(job)


def crash(*args, **kwargs) -> None:
    """A heavy half with a bug in it."""
    raise RuntimeError("boom")
