"""Checks of a run that need no model and no torch: prompts are text the pipeline can read
(prompt-map keys are frames of the video), input files exist, the device can exist."""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path

import av
from PIL import Image

from ..options import GROUPS, VIDEO_SUFFIXES, ModelOptions
from .config import PATH_OPTIONS, Run
from .estimate import DEFAULT_FRAMES
from .flags import UsageError, flag_of

OPTION_CLASSES = (ModelOptions, *GROUPS.values())


_INDEX = re.compile(r"-?\d+")


def check_texts(run: Run) -> None:
    """Prompts must be valid text, and a prompt map's keys frames of the video."""
    options = run.options()
    p = options.prompting
    texts = [("the prompt", run.prompt), ("the negative prompt", run.negative_prompt)]
    texts += [("--prompt-head", p.prompt_head), ("--prompt-tail", p.prompt_tail)]
    for what, text in texts:
        for value in text.values() if isinstance(text, Mapping) else [text]:
            _check_utf8(what, value)
    for key, value in (
        run.prompt.items() if isinstance(run.prompt, Mapping) else [(None, run.prompt)]
    ):
        if not value.strip():  # (an empty negative prompt is the usual one)
            raise UsageError(
                "the prompt is empty" if key is None else f"the prompt of frame {key} is empty"
            )
    frames = options.sampling.num_frames
    if frames is None and options.init.init_video is None:
        frames = DEFAULT_FRAMES
    for what, text in texts[:2]:
        if isinstance(text, Mapping):
            _check_keys(what, text, frames)


def _check_utf8(what: str, text: object) -> None:
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected text, got {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"{what} is not valid UTF-8 text (byte {byte!r} at character {e.start})"
        ) from None


def _check_keys(what: str, prompt_map: Mapping, frames: int | None) -> None:
    seen: dict[int, object] = {}
    for key in prompt_map:
        if isinstance(key, bool) or not (
            isinstance(key, int) or (isinstance(key, str) and _INDEX.fullmatch(key.strip()))
        ):
            raise UsageError(f"{what}: prompt-map key {key!r} is not a frame number")
        index = int(key)
        if frames is None:
            continue
        if index == -1:
            index = frames - 1
        if not 0 <= index < frames:
            raise UsageError(
                f"{what}: prompt-map key {key!r} is outside frames 0..{frames - 1} "
                "(-1: the last frame)"
            )
        if index in seen:
            raise UsageError(f"{what}: prompt-map keys {seen[index]!r} and {key!r} name one frame")
        seen[index] = key


def check_inputs(run: Run) -> None:
    """Images and videos named by path (init, control, reference) must exist."""
    options = run.options().flat()
    for name in PATH_OPTIONS:
        values = options[name]
        flag = flag_of(name, OPTION_CLASSES)
        for value in values if isinstance(values, list | tuple) else [values]:
            if value is None:
                continue
            if not isinstance(value, str):  # from a config or settings file
                raise UsageError(f"{flag}: expected a file path, got {value!r}")
            if not Path(value).exists():
                raise UsageError(f"{flag} {value}: not found")
            if not (Path(value).is_file() or Path(value).is_dir()):
                raise UsageError(f"{flag} {value}: not a regular file or folder")
            _check_media(flag, Path(value))


def _check_media(flag: str, path: Path) -> None:
    """An image file must decode as one, a video file must hold a video stream (folders of
    frames are read later, frame by frame)."""
    if not path.is_file():
        return
    try:
        if path.suffix.lower() in VIDEO_SUFFIXES and path.suffix.lower() not in (".gif", ".webp"):
            with av.open(str(path)) as container:
                if not container.streams.video:
                    raise ValueError("no video stream")
        else:
            with Image.open(path) as image:
                image.verify()
    except Exception as e:  # noqa: BLE001 - whatever the decoder says: not usable
        what = "video" if path.suffix.lower() in VIDEO_SUFFIXES else "image"
        raise UsageError(f"{flag} {path}: not a readable {what} ({type(e).__name__})") from None


# Present wherever a CUDA (or ROCm, which torch also calls cuda) device can be used on Linux.
GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def check_device(name: str) -> None:
    """`--device cuda` where no GPU driver exists at all is said at once; whether torch can
    use the device is checked once it is imported (`render.device`)."""
    if not name.startswith("cuda"):
        return
    no_driver = sys.platform == "darwin" or (
        sys.platform == "linux" and not any(os.path.exists(f) for f in GPU_DRIVER_FILES)
    )
    if no_driver:
        raise UsageError(f"--device {name}: CUDA is not available on this machine (no GPU driver)")


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def check_combinations(run: Run) -> None:
    """Options that need another option, or must agree with it in number."""
    options, m = run.options(), run.models
    c = options.control
    needs = (
        (c.control_images, m.sparsectrl, "--control-images", "--sparsectrl"),
        (c.controlnet_images, m.controlnets, "--controlnet-images", "--controlnet"),
        (c.ip_adapter_images, m.ip_adapter, "--ip-adapter-images", "--ip-adapter"),
        (m.image_encoder, m.ip_adapter, "--image-encoder", "--ip-adapter"),
    )
    for value, needed, flag, other in needs:
        if value is not None and not needed:
            raise UsageError(f"{flag} needs {other}")

    init = options.init.init_image is not None or options.init.init_video is not None
    if options.noise.freeinit_iterations and init:
        raise UsageError(
            "--freeinit re-draws the initial noise: not with --init-image/--init-video"
        )
    _check_controlnet_counts(c, len(m.controlnets))
    images = c.control_images if isinstance(c.control_images, list | tuple) else [c.control_images]
    if c.control_frames is not None and all(
        isinstance(i, str) and i.lower().endswith(IMAGE_SUFFIXES) for i in images
    ):
        if len(images) != len(c.control_frames):
            raise UsageError(
                f"{len(images)} --control-images for {len(c.control_frames)} --control-frames"
            )


def _check_controlnet_counts(c, n: int) -> None:
    images = c.controlnet_images
    if images is not None and n > 1 and len(images) != n:
        raise UsageError(f"{len(images)} --controlnet-images for {n} --controlnet")
    for name in ("controlnet_scale", "controlnet_start", "controlnet_end"):
        values = getattr(c, name)
        count = len(values) if isinstance(values, tuple | list) else 1
        if n and count not in (1, n):
            flag = flag_of(name, OPTION_CLASSES)
            raise UsageError(f"{count} values of {flag} for {n} --controlnet")
