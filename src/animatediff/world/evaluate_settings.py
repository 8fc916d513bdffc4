"""The evaluation's fixed settings and prompt sets, and the options of `animatediff evaluate`:
torch-free, so that the command line can read them before it loads any model."""

from __future__ import annotations

import argparse
from pathlib import Path

from .scene import Scene, Sprite, caption

SIZE = 64
NUM_FRAMES = 16
STEPS = 25
GUIDANCE_SCALE = 7.5
NEGATIVE_PROMPT = ""
SEEDS = (0,)  # one seed per prompt keeps a full run to minutes on a CPU
QUICK_SEEDS = (0,)
CAMERA_SEEDS = tuple(range(8))  # a MotionLoRA must move its way at (nearly) every one


def _prompt(kind: str, *sprites: tuple[str, str], background: str, **words) -> str:
    scene = Scene(tuple(Sprite(shape, colour) for shape, colour in sprites), background)
    return caption(scene, kind, **words)


# Every colour, shape and background, and each object motion (two per motion kind).
PROMPTS: tuple[str, ...] = (  # ordered so that any first N covers the kinds of motion evenly
    _prompt("static", ("circle", "red"), background="black"),
    _prompt("move", ("square", "blue"), background="white", direction="left", speed="slowly"),
    _prompt("grow", ("circle", "yellow"), background="green"),
    _prompt("shrink", ("triangle", "blue"), background="black"),
    _prompt("turn", ("square", "purple"), background="white"),
    _prompt("move", ("triangle", "white"), background="green", direction="right", speed="quickly"),
    _prompt("static", ("star", "yellow"), ("circle", "red"), background="blue"),
    _prompt("move", ("circle", "purple"), background="black", direction="right", speed="slowly"),
    _prompt("move", ("star", "green"), background="white", direction="left", speed="quickly"),
    _prompt("grow", ("square", "red"), background="blue"),
    _prompt("shrink", ("star", "white"), background="blue"),
    _prompt("turn", ("triangle", "green"), background="black"),
)
QUICK_PROMPTS: tuple[str, ...] = (PROMPTS[1], PROMPTS[0])  # one moving, one static
CAMERA_PROMPTS: dict[str, tuple[str, ...]] = {
    "zoom-in": (
        _prompt("zoom-in", ("circle", "red"), background="blue"),
        _prompt("zoom-in", ("square", "green"), background="black"),
        _prompt("zoom-in", ("triangle", "yellow"), background="white"),
    ),
    "pan-left": (
        _prompt("pan-left", ("star", "white"), background="green"),
        _prompt("pan-left", ("circle", "purple"), background="white"),
        _prompt("pan-left", ("square", "blue"), background="black"),
    ),
}


def _extra(text: str) -> tuple[str, tuple[str, dict]]:
    """NAME=PATH[,rank=R,clips=N,kind=K] -> (name, (path, info))."""
    name, _, rest = text.partition("=")
    path, *pairs = rest.split(",")
    if not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=PATH[,rank=R,clips=N], got {text!r}")
    info = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        info[key] = int(value) if value.isdigit() else value
    return name, (path, info)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `animatediff evaluate`."""
    p.add_argument("--steps", type=int, default=STEPS)
    p.add_argument("--guidance-scale", type=float, default=GUIDANCE_SCALE)
    p.add_argument("--frames", type=int, default=NUM_FRAMES)
    p.add_argument("--seeds", type=int, nargs="+", help=f"default: {' '.join(map(str, SEEDS))}")
    p.add_argument(
        "--camera-seeds",
        type=int,
        nargs="+",
        help=f"seeds a MotionLoRA is judged at one by one (default: {CAMERA_SEEDS[0]}-{CAMERA_SEEDS[-1]})",
    )
    p.add_argument("--quick", action="store_true", help="2 prompts, 1 seed")
    p.add_argument("--prompts", type=int, help=f"the first N of the {len(PROMPTS)} prompts")
    p.add_argument("--device")
    p.add_argument(
        "--extra-motion-lora",
        type=_extra,
        action="append",
        default=[],
        metavar="NAME=PATH[,rank=R,clips=N]",
    )
    p.add_argument("--out", type=Path, help="write the results as JSON here")
    p.add_argument(
        "--student",
        type=Path,
        help="instead: compare this distilled motion module with the built-in teacher "
        "(world/compare.py)",
    )
    p.add_argument("--student-steps", type=int, nargs="+", default=[4, 8])
    p.add_argument("--student-guidance", type=float, help="default: its preset's")
    p.add_argument("--student-adapter", type=Path, help="the student's image-layer LoRA")
