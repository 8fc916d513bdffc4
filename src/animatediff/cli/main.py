"""`animatediff` command line: a thin layer over the library.

Each command has a light half that parses and checks its arguments without importing torch
(which takes seconds), and a heavy half imported only once the checks pass: this file is the
one place in the package that imports lazily, for that reason. A mistake (a bad flag, value,
file or config) prints one line and exits 2; any other failure prints a short report with a hint
to rerun with `--debug`, which shows the traceback (`--debug` works before or after the command).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import UsageError, UserError
from ..world.evaluate import add_arguments as evaluate_arguments
from . import generate
from .flags import Parser

EXIT_USAGE = 2
EXIT_FAILURE = 1
log = logging.getLogger("animatediff")

# command -> (module of its heavy half, function), imported after the light checks
HEAVY = {
    "generate": ("animatediff.cli.render", "execute"),
    "convert": ("animatediff.cli.commands", "convert"),
    "inspect": ("animatediff.cli.commands", "inspect"),
    "models": ("animatediff.cli.commands", "models"),
    "train": ("animatediff.cli.commands", "train_command"),
    "evaluate": ("animatediff.cli.commands", "evaluate_command"),
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


def build_parser() -> Parser:
    common = _common()
    parser = Parser(prog="animatediff", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"animatediff {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    kw = dict(parents=[common], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    generate.add_arguments(sub.add_parser("generate", help="text to animation", **kw))
    c = sub.add_parser("convert", help="convert a motion module or a single-file checkpoint", **kw)
    c.add_argument("input")
    c.add_argument(
        "output", help="file (.safetensors/.ckpt: original layout) or folder (diffusers)"
    )
    c.add_argument("--to", choices=("original", "diffusers"), help="default: from the output name")
    c.add_argument("--base", help="with a single-file checkpoint: the SD1.5 folder for configs")
    c.add_argument("--motion-version", choices=("v1", "v2", "v3"))
    c.add_argument("--overwrite", action="store_true")
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
    return parser


def prepare(args: argparse.Namespace):
    """The light half: checks that need no model; returns what the heavy half takes."""
    if args.command == "generate":
        return generate.prepare(args)
    for name in ("input", "file", "config"):
        path = getattr(args, name, None)
        if path is not None and not Path(path).exists():
            raise UsageError(f"{name}: file not found: {path}")
    return args


def _logging(args: argparse.Namespace) -> None:
    level = logging.WARNING - 10 * getattr(args, "verbose", 0) + 10 * getattr(args, "quiet", 0)
    logging.basicConfig(format="animatediff: %(message)s", level=max(level, logging.DEBUG))
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):  # our messages only
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        _logging(args)
        checked = prepare(args)
        module, name = HEAVY[args.command]
        getattr(importlib.import_module(module), name)(checked)
    except (UserError, FileNotFoundError, FileExistsError) as e:
        if debug:
            raise
        print(f"animatediff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("animatediff: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if debug:
            raise
        print(f"animatediff: unexpected error: {type(e).__name__}: {e}", file=sys.stderr)
        print("animatediff: rerun with --debug for the traceback, and report it", file=sys.stderr)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
