"""`animatediff ui`, its heavy half: load nothing yet, scan the model folders, start Gradio."""

from __future__ import annotations

import argparse
import logging

from ..errors import UsageError
from ..ui.app import launch
from ..ui.service import Service
from .render import device, dtype


def serve(args: argparse.Namespace) -> None:
    """Start the server and block until Ctrl-C."""
    logging.getLogger("animatediff").setLevel(logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup probes
    dev = device(args.device)
    limit = int(args.max_upload_mb * 2**20)
    service = Service(
        args.models, args.outputs, dev, dtype(args.dtype, dev), args.dtype, upload_limit=limit
    )
    try:
        launch(service, args.host, args.port, auth=args.auth, max_file_size=limit)
    except OSError as e:  # Gradio's "Cannot find empty port", a bad --host
        raise UsageError(f"cannot listen on {args.host}:{args.port} ({e})") from None
