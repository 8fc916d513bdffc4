"""The project's error types for a user's mistakes: a bad value, file, config or command.

They are ValueErrors (so `except ValueError` still works) and share one base, `UserError`,
which the command line shows as one line with exit code 2; anything else is a bug and gets a
short report pointing at `--debug`. Torch-free, at the bottom, so every layer can raise them.
"""

from __future__ import annotations

import os
from collections.abc import Iterable


class UserError(ValueError):
    """A mistake in what the user asked for or gave; the message says what and where."""


class ConfigError(UserError):
    """A config file (generation or training) that cannot be used as written."""


class UsageError(UserError):
    """A mistake in how a command was called."""


class NonFiniteResult(UserError):
    """A generation whose numbers overflowed or became NaN: a broken model file or an extreme
    setting, never a video to save."""


class CheckpointError(UserError):
    """A weight file is missing, unreadable, corrupt, unsafe, or not what it claims to be."""

    def __init__(self, path: str | os.PathLike, message: str) -> None:
        self.path = os.fspath(path)
        self.message = message
        super().__init__(f"{self.path}: {message}")

    def __reduce__(self) -> tuple[type[CheckpointError], tuple[str, str]]:
        # Keep the two-argument constructor working across pickling (e.g. multiprocessing).
        return (type(self), (self.path, self.message))


def first_keys(keys: Iterable[str], n: int = 5) -> str:
    """The first `n` keys (sorted) for an error message, noting how many were left out."""
    items = sorted(str(k) for k in keys)
    if not items:
        return "(none)"
    shown = ", ".join(items[:n])
    extra = len(items) - n
    return f"{shown}, ... and {extra} more" if extra > 0 else shown
