"""The project's error types for a user's mistakes: a bad value, file, config or command.

They are ValueErrors (so `except ValueError` still works) and share one base, `UserError`,
which the command line shows as one line with exit code 2; anything else is a bug and gets a
short report pointing at `--debug`. Torch-free, at the bottom, so every layer can raise them.
"""

from __future__ import annotations


class UserError(ValueError):
    """A mistake in what the user asked for or gave; the message says what and where."""


class ConfigError(UserError):
    """A config file (generation or training) that cannot be used as written."""


class UsageError(UserError):
    """A mistake in how a command was called."""
