"""Command-line flags built from the option dataclasses' fields (`animatediff.options`).

Each field becomes one flag (its `flag` metadata, else `--field-name`), with its help, default
and choices shown in `--help`. Flags keep their default out of the parsed namespace
(`argparse.SUPPRESS`), so `given()` knows exactly what the user typed: with `--config`, those
values override every entry's. Values reach the dataclasses as the strings typed, and the
dataclasses check them (one rule for the CLI, configs and Python).
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from ..errors import UsageError
from ..options import OptionError


class Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake raises UsageError (one line, exit 2) instead of printing
    the usage block."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


def printable(text: str) -> str:
    """Text safe to print anywhere: bytes that were not UTF-8 (which Python keeps as lone
    surrogates in arguments and file names) are shown as `\\xNN` escapes."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def flag_name(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def _help(f: dataclasses.Field) -> str:
    text = f.metadata["help"]
    default = f.default if f.default is not dataclasses.MISSING else None
    if default not in (None, (), "", False):
        text += f" (default: {default})"
    return text.replace("%", "%%")


def add_flags(parser: argparse.ArgumentParser, cls: type, title: str | None = None) -> None:
    """One flag per field of the options dataclass `cls`, in a group of `--help`."""
    group = parser.add_argument_group(title or cls.__doc__.splitlines()[0].rstrip("."))
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("cli", True) is False:
            continue
        kwargs: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=_help(f))
        if meta.get("kind") is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            for key in ("choices", "nargs", "action", "metavar"):
                if key in meta:
                    kwargs[key] = meta[key]
            if "choices" in meta and "metavar" not in meta:
                kwargs["metavar"] = "{" + ",".join(meta["choices"]) + "}"
                kwargs.pop("choices")  # checked by the dataclass, with a clearer message
        group.add_argument(flag_name(f), *meta.get("aliases", ()), **kwargs)


def given(args: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of `cls` the user gave on the command line, as typed."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)}


def flag_of(name: str, classes: tuple[type, ...]) -> str:
    """The flag spelling of option `name` (for messages)."""
    for cls in classes:
        for f in dataclasses.fields(cls):
            if f.name == name:
                return flag_name(f)
    return name


def as_usage_error(error: OptionError, classes: tuple[type, ...]) -> UsageError:
    """An option error reworded with the flag the user typed."""
    if error.name is None:
        return UsageError(str(error))
    return UsageError(str(error.renamed(flag_of(error.name, classes))))
