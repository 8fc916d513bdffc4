"""What a run will cost, estimated before any model loads: memory for the decoded frames
(refused when this machine cannot hold them) and the number of UNet evaluations (said when
the run is long). Sizes have stated maxima too (`options.MAX_SIZE`, `MAX_FRAMES`)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

from .. import builtin
from ..errors import UsageError
from ..options import Options

log = logging.getLogger("animatediff")
# float32 frames as decoded, the copy concatenating them, and the uint8 frames written
BYTES_PER_SAMPLE = 4 + 4 + 1
LONG_RUN = 2000  # UNet evaluations from which a run is announced as long
DEFAULT_FRAMES = 16
DEFAULT_SIZE = 512  # SD1.5's


def native_size(base: str | None) -> int:
    """Pixels per side the base makes by default (its UNet's sample size x the VAE's
    factor), read from its configs; SD1.5's 512 when they cannot be read (a Hub id)."""
    shipped = builtin.shipped()
    folder = Path(base) if base else shipped.base if shipped else builtin.cache_dir() / "base"
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        vae = json.loads((folder / "vae" / "config.json").read_text())
        return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_SIZE


def available_memory() -> int | None:
    """Bytes of memory free for this run (Linux: MemAvailable), None if unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


def check(options: Options, base: str | None, where: str = "") -> None:
    """Refuse a run whose frames cannot fit in memory; announce a long one. `where` names
    the run in messages (a config entry)."""
    where = f"{where}: " if where else ""
    s = options.sampling
    if s.num_frames is None and options.init.init_video is not None:
        return  # its length is the video's, read later
    frames = s.num_frames or DEFAULT_FRAMES
    size = native_size(base) if s.height is None or s.width is None else 0
    height, width = s.height or size, s.width or size
    videos = s.num_videos_per_prompt
    need = videos * frames * height * width * 3 * BYTES_PER_SAMPLE
    free = available_memory()
    if free is not None and need > free:
        raise UsageError(
            f"{where}{videos} x {frames} frames of {width}x{height} need about "
            f"{need / 2**30:.1f} GiB of memory once decoded, and {free / 2**30:.1f} GiB is free; "
            "lower --frames, --width/--height or --num-videos"
        )
    evaluations = unet_evaluations(options, frames)
    if evaluations >= LONG_RUN:
        log.warning(
            "%sabout %d UNet evaluations (%d frames of %dx%d): a long run; "
            "Ctrl-C stops it and writes nothing",
            where, evaluations, frames, width, height,
        )  # fmt: skip


def unet_evaluations(options: Options, frames: int) -> int:
    """Windows x steps x (2 with guidance) x FreeInit passes x videos."""
    c, s = options.context, options.sampling
    windows = 1
    if c.applies(frames):
        windows = math.ceil((frames - c.context_overlap) / c.hop) * c.context_stride
    steps = s.num_inference_steps or 25
    guided = 2 if (s.guidance_scale is None or s.guidance_scale > 1) else 1
    passes = 1 + options.noise.freeinit_iterations
    return windows * steps * guided * passes * s.num_videos_per_prompt
