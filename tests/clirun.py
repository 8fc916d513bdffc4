"""Running the `animatediff` command line in-process, for the CLI tests.

`cli(cwd, *args)` calls `animatediff.cli.main.main(argv)` in folder `cwd` and returns its exit
code with what it printed; `cli_environment()` sets up what `main` would have in a fresh
process. `main` gives the package logger a stderr handler for the run and restores it after, so
the command's log messages (e.g. its warnings) are in the captured stderr, as in a process.
In-process runs share the imports of torch and diffusers, which a process pays for
every command; the few properties only a process shows (the entry point, `--debug`
tracebacks) are tested with real processes in test_cli.py.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import diffusers.utils.logging
import huggingface_hub.utils
import pytest
import transformers.utils.logging

from animatediff.cli.main import main

# Environment variables `main` sets for itself (quiet libraries); restored after every call.
SET_BY_MAIN = ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS")


@dataclass(frozen=True)
class Run:
    """One finished `animatediff` command."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    def __str__(self) -> str:  # what an assertion failure shows
        return (
            f"animatediff {' '.join(self.args)}  (in {self.cwd}, exit {self.returncode})\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    def saved(self) -> list[str]:
        """The paths the command reported as `saved PATH`."""
        return [
            line[len("saved ") :] for line in self.stdout.splitlines() if line.startswith("saved ")
        ]


def cli(cwd: Path, *args: object) -> Run:
    """`animatediff ARGS` in folder `cwd`, in this process. (Redirecting sys.stdout/stderr,
    unlike pytest's capsys, also works in module-scoped fixtures that share a run.)"""
    argv = tuple(str(a) for a in args)
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp, redirect_stdout(out), redirect_stderr(err):
        mp.chdir(cwd)
        for name in SET_BY_MAIN:
            mp.delenv(name, raising=False)
        code = main(list(argv))
    return Run(argv, code, out.getvalue(), err.getvalue(), cwd)


def assert_ok(run: Run) -> None:
    assert run.returncode == 0, run
    assert "Traceback" not in run.stderr, run


def assert_usage_error(run: Run, *needles: str) -> str:
    """Exit 2, exactly one `animatediff: error: ...` line on stderr naming every needle, no
    traceback, nothing on stdout; returns the line."""
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run
    assert lines[0].startswith("animatediff: error: "), run
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the message\n{run}"
    assert not run.stdout.strip(), run
    return lines[0]


@contextmanager
def cli_environment(cache: Path) -> Iterator[None]:
    """No network; a tree without the shipped model builds its random one in `cache` rather
    than the user's cache; and the libraries' progress bars and chatter off, as `main` has them
    in a fresh process (here the libraries were imported before it runs). All restored after."""
    libraries = (diffusers.utils.logging, transformers.utils.logging)
    before = [(lib.is_progress_bar_enabled(), lib.get_verbosity()) for lib in libraries]
    hub_bars = not huggingface_hub.utils.are_progress_bars_disabled()
    for lib in libraries:
        lib.disable_progress_bar()
        lib.set_verbosity_error()
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("HF_HUB_OFFLINE", "1")
            mp.setenv("ANIMATEDIFF_CACHE", str(cache))
            yield
    finally:
        for lib, (bars, verbosity) in zip(libraries, before):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()
        if hub_bars:
            huggingface_hub.utils.enable_progress_bars()
