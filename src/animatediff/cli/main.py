"""`animatediff` command line: a thin layer over the library.

Each command has a light half that parses and checks its arguments without importing torch
(which takes seconds), and a heavy half imported only once the checks pass (with importlib,
like the package root's re-exports: the only lazy imports in the package). A mistake (a bad flag, value,
file or config) prints one line and exits 2; any other failure prints a short report with a hint
to rerun with `--debug`, which shows the traceback (`--debug` works before or after the command).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import importlib
import logging
import os
import signal
import sys
import traceback
from collections.abc import Iterator
from pathlib import Path

from huggingface_hub.utils import disable_progress_bars

from .. import __version__
from ..errors import UsageError, UserError
from ..training.config import load_config
from ..training.outputs import check_output_dir
from ..world.evaluate_settings import add_arguments as evaluate_arguments
from . import generate, ui
from .flags import Parser, printable
from .outputs import check_writable

EXIT_USAGE = 2
EXIT_FAILURE = 1
EXIT_TERMINATED = 128 + signal.SIGTERM
# Failures of the machine rather than of the program: one line, like a user's mistake.
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC,
    errno.EROFS,
    errno.EACCES,
    errno.EPERM,
    errno.EDQUOT,
    errno.ENAMETOOLONG,
}
log = logging.getLogger("animatediff")

# command -> (module of its heavy half, function), imported after the light checks
HEAVY = {
    "generate": ("animatediff.cli.render", "execute"),
    "convert": ("animatediff.cli.commands", "convert"),
    "inspect": ("animatediff.cli.commands", "inspect"),
    "models": ("animatediff.cli.commands", "models"),
    "train": ("animatediff.cli.commands", "train_command"),
    "evaluate": ("animatediff.cli.commands", "evaluate_command"),
    "ui": ("animatediff.cli.serve", "serve"),
}


def _common() -> argparse.ArgumentParser:
    """Flags every command takes, before or after its name."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks"
    )
    common.add_argument(
        "-v", "--verbose", action="count", default=argparse.SUPPRESS, help="more output"
    )
    common.add_argument(
        "-q", "--quiet", action="count", default=argparse.SUPPRESS, help="less output"
    )
    return common


class _Formatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults in `--help`, except the empty ones (None, False, "")."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False, "", argparse.SUPPRESS):
            return action.help
        return super()._get_help_string(action)


def build_parser() -> Parser:
    common = _common()
    parser = Parser(prog="animatediff", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"animatediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    kw = dict(parents=[common], formatter_class=_Formatter)
    generate.add_arguments(sub.add_parser("generate", help="text to animation", **kw))
    c = sub.add_parser("convert", help="convert a motion module or a single-file checkpoint", **kw)
    c.add_argument("input")
    c.add_argument(
        "output", help="file (.safetensors/.ckpt: original layout) or folder (diffusers)"
    )
    c.add_argument("--to", choices=("original", "diffusers"), help="default: from the output name")
    c.add_argument("--base", help="with a single-file checkpoint: the SD1.5 folder for configs")
    c.add_argument("--motion-version", choices=("v1", "v2", "v3"))
    c.add_argument("--overwrite", action="store_true", help="replace an existing output")
    t = sub.add_parser(
        "train", help="train a domain adapter, motion module or MotionLoRA, or distil one", **kw
    )
    t.add_argument("config", help="training config YAML (see README)")
    runs = t.add_mutually_exclusive_group()
    runs.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    runs.add_argument(
        "--overwrite", action="store_true", help="replace the run already in output_dir"
    )
    t.add_argument("--encode", metavar="DIR", help="only pre-encode the dataset's latents into DIR")
    sub.add_parser("models", help="list the built-in models, styles and MotionLoRAs", **kw)
    evaluate_arguments(
        sub.add_parser("evaluate", help="measure the built-in models (paper's Table 1)", **kw)
    )
    i = sub.add_parser("inspect", help="what a checkpoint file is", **kw)
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    ui.add_arguments(sub.add_parser("ui", help="start the web UI (Gradio) on this machine", **kw))
    return parser


def prepare(args: argparse.Namespace):
    """The light half: checks that need no model; returns what the heavy half takes."""
    if args.command == "generate":
        return generate.prepare(args)
    if args.command == "ui":
        return ui.prepare(args)
    for name in ("input", "file", "config"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).exists():
            raise UsageError(f"{name}: file not found: {path}")
    if args.command == "convert":
        output = Path(args.output)
        suffix = output.suffix.lower()
        if (
            suffix
            and suffix not in (".safetensors", ".ckpt", ".pt", ".pth")
            and args.to != "diffusers"
        ):
            raise UsageError(
                f"{output}: write a .safetensors file, or a folder (no suffix, or --to diffusers)"
            )
        if (output.exists() or output.is_symlink()) and not args.overwrite:
            raise UsageError(f"{output} already exists; pass --overwrite to replace it")
        check_writable(output.parent, "output")
    if args.command == "train":  # the whole config, and where it writes, before torch loads
        args.training = load_config(args.config)  # read once: the heavy half trains this
        if not args.encode:
            check_output_dir(Path(args.training.output_dir), args.resume, args.overwrite)
    return args


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that temporary files are cleaned up."""


@contextlib.contextmanager
def _sigterm_raises() -> Iterator[None]:
    def handler(signum, frame):
        raise Terminated

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _Stderr(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (in-process callers may redirect it)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass

    def format(self, record: logging.LogRecord) -> str:
        return printable(super().format(record))


def _logging(args: argparse.Namespace) -> None:
    level = logging.WARNING - 10 * getattr(args, "verbose", 0) + 10 * getattr(args, "quiet", 0)
    log.setLevel(max(level, logging.DEBUG))
    log.propagate = False  # one line per message, whatever the root logger does
    if not any(isinstance(h, _Stderr) for h in log.handlers):
        handler = _Stderr()
        handler.setFormatter(logging.Formatter("animatediff: %(message)s"))
        log.addHandler(handler)
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # our messages only
        os.environ.setdefault(name, "error")
    if os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS") != "0":
        # huggingface_hub is imported already, so its variable alone would come too late; and
        # transformers, imported later, takes its "Loading weights" bars' setting from here.
        disable_progress_bars()


def run(argv: list[str]) -> None:
    args = build_parser().parse_args(argv)
    _logging(args)
    checked = prepare(args)
    try:
        module, name = HEAVY[args.command]
        getattr(importlib.import_module(module), name)(checked)
    finally:
        getattr(checked, "close", lambda: None)()  # e.g. free the output names reserved


def _is_mistake(e: Exception) -> bool:
    """A user's mistake, or a failure of the machine (disk full, read-only): one line."""
    if isinstance(e, UserError | FileNotFoundError | FileExistsError):
        return True
    return isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRNOS


def _message(e: Exception) -> str:
    if isinstance(e, OSError) and not isinstance(e, UserError) and e.strerror:
        return f"{e.filename}: {e.strerror}" if e.filename else e.strerror
    return str(e)


@contextlib.contextmanager
def _logger_restored() -> Iterator[None]:
    """The package logger as it was, after the command (in-process callers: tests, the UI)."""
    saved = (log.level, log.propagate, list(log.handlers))
    try:
        yield
    finally:
        log.setLevel(saved[0])
        log.propagate = saved[1]
        log.handlers[:] = saved[2]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        with _sigterm_raises(), _logger_restored():
            run(argv)
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("animatediff: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("animatediff: terminated", file=sys.stderr)
        return EXIT_TERMINATED
    except Exception as e:
        if debug:  # the traceback, and still the exit code that says whose mistake it was
            traceback.print_exc()
            return EXIT_USAGE if _is_mistake(e) else EXIT_FAILURE
        if _is_mistake(e):
            print(f"animatediff: error: {printable(_message(e))}", file=sys.stderr)
            return EXIT_USAGE
        message = printable(f"{type(e).__name__}: {e}")
        print(f"animatediff: unexpected error: {message}", file=sys.stderr)
        print("animatediff: rerun with --debug for the traceback, and report it", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
