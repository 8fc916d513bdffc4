"""`animatediff ui`, its light half: arguments and the checks that need no model. The web UI
needs Gradio, an optional extra (`pip install "animatediff[ui]"`); `serve.py` starts it."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import math
from pathlib import Path

from ..errors import UsageError
from ..options import DEVICE
from .checks import check_device

log = logging.getLogger("animatediff")

INSTALL = 'the web UI needs Gradio: pip install "animatediff[ui]"'
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on")
    p.add_argument("--auth", metavar="USER:PASSWORD", help="require this login")
    p.add_argument(
        "--models",
        action="append",
        default=[],
        metavar="DIR",
        help="a folder of models to offer (repeatable; files recognised by content)",
    )
    p.add_argument("--outputs", default="outputs/ui", metavar="DIR", help="where results go")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--dtype", choices=("fp32", "fp16", "bf16"), help="default: fp16 on cuda")
    p.add_argument("--max-upload-mb", type=float, default=50, help="largest upload accepted")


def _has_gradio() -> bool:
    try:
        return importlib.util.find_spec("gradio") is not None
    except ValueError:  # present in sys.modules without a spec: blocked
        return False


def prepare(args: argparse.Namespace) -> argparse.Namespace:
    """Check the arguments; `args.auth` becomes a (user, password) pair or None."""
    if not _has_gradio():
        raise UsageError(INSTALL)
    if not 0 < args.port < 65536:
        raise UsageError(f"--port {args.port}: not a port number")
    if not math.isfinite(args.max_upload_mb) or args.max_upload_mb <= 0:
        raise UsageError("--max-upload-mb must be a positive number")
    if not DEVICE.fullmatch(args.device):
        raise UsageError(f"--device {args.device!r}: not a device (auto, cpu, cuda, cuda:N, mps)")
    check_device(args.device)
    for folder in args.models:
        if not Path(folder).is_dir():
            raise UsageError(f"--models {folder}: not a folder")
    if args.auth is not None:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise UsageError("--auth: use USER:PASSWORD")
        args.auth = (user, password)
    if args.host not in LOCAL_HOSTS and args.auth is None:
        log.warning("listening on %s without --auth: anyone reaching it can use it", args.host)
    return args
