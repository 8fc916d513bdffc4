"""Clips of the miniature world: one sprite moves, grows, shrinks or turns, or the camera moves.

A clip is planned as a start and an end scene and interpolated between them, so every motion
is steady (linear in position and angle, geometric in size and zoom) and fully in frame.
"turning" is always clockwise on screen, and never a circle (it would not show).
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .scene import (
    DIRECTIONS,
    SHAPES,
    SPEEDS,
    SYMMETRY,
    Camera,
    Scene,
    as_rng,
    caption,
    pick,
    random_scene,
    render,
)

OBJECT_KINDS = ("static", "move", "grow", "shrink", "turn")
CAMERA_KINDS = ("zoom-in", "pan-left")  # kept out of the base set: MotionLoRAs learn these
KINDS = OBJECT_KINDS + CAMERA_KINDS

STEP = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
DISTANCE = {"slowly": 0.2, "quickly": 0.4}  # frame widths travelled over a whole clip
GROWTH = 1.6  # size ratio end / start of a grow (start / end of a shrink)
TURN = 0.45  # fraction of the shape's symmetry period turned; under half, so the sense is clear
ZOOM = 1.6  # zoom at the end of a zoom-in
PAN = 0.4  # frame widths the view travels in a pan

# Pan convention, as the built-in model's spec states it: in a "pan-left" clip the scene content
# (sprites and background) moves LEFT in the frame. Evaluation compares the sign of the tracked
# centroid's x displacement with this constant.
PAN_LEFT_DX = -1


def _plan(rng: np.random.Generator, kind: str) -> tuple[Scene, Scene, dict]:
    """Start scene, end scene and the caption's motion words for a clip of ``kind``."""
    if kind == "static":
        scene = random_scene(rng)
        return scene, scene, {}
    if kind == "move":
        direction, speed = pick(rng, DIRECTIONS), pick(rng, SPEEDS)
        (sx, sy), d = STEP[direction], DISTANCE[speed]
        scene = random_scene(rng, 1, radius=(0.15, 0.2), pad=(abs(sx) * d / 2, abs(sy) * d / 2))
        half, words = (sx * d / 2, sy * d / 2), {"direction": direction, "speed": speed}
        return _shift(scene, -1, half), _shift(scene, +1, half), words
    if kind in ("grow", "shrink"):
        big = random_scene(rng, 1, radius=(0.13 * GROWTH, 0.17 * GROWTH))
        small = _resize(big, 1 / GROWTH)
        return (small, big, {}) if kind == "grow" else (big, small, {})
    if kind == "turn":
        start = random_scene(rng, 1, shapes=tuple(s for s in SHAPES if s != "circle"))
        sprite = start.sprites[0]
        end = replace(sprite, angle=sprite.angle + TURN * SYMMETRY[sprite.shape])
        return start, replace(start, sprites=(end,)), {}
    if kind == "zoom-in":
        # Zooming about the centre pushes a sprite out by the zoom: keep it near the middle.
        pad = 0.5 * (1 - 1 / ZOOM)
        start = random_scene(rng, 1, radius=(0.12, 0.16), pad=(pad, pad))
        return start, replace(start, camera=Camera(zoom=ZOOM)), {}
    if kind == "pan-left":
        scene = random_scene(rng, 1, radius=(0.15, 0.2), pad=(PAN / 2, 0))
        # The view travels +x over the world, so the content drifts left on screen (PAN_LEFT_DX).
        start = replace(scene, camera=Camera(x=0.5 - PAN / 2))
        return start, replace(scene, camera=Camera(x=0.5 + PAN / 2)), {}
    raise ValueError(f"unknown motion kind {kind!r}; expected one of {KINDS}")


def _shift(scene: Scene, sign: int, half: tuple[float, float]) -> Scene:
    sprite = scene.sprites[0]
    moved = replace(sprite, x=sprite.x + sign * half[0], y=sprite.y + sign * half[1])
    return replace(scene, sprites=(moved,))


def _resize(scene: Scene, ratio: float) -> Scene:
    return replace(scene, sprites=tuple(replace(s, size=s.size * ratio) for s in scene.sprites))


def _lerp(a: float, b: float, t: float, geometric: bool = False) -> float:
    if geometric:  # constant rate of change for sizes and zoom
        return a * (b / a) ** t
    return a + (b - a) * t


def interpolate(start: Scene, end: Scene, t: float) -> Scene:
    """The scene a fraction ``t`` of the way from ``start`` to ``end``."""
    sprites = tuple(
        replace(
            a,
            x=_lerp(a.x, b.x, t),
            y=_lerp(a.y, b.y, t),
            size=_lerp(a.size, b.size, t, geometric=True),
            angle=_lerp(a.angle, b.angle, t),
        )
        for a, b in zip(start.sprites, end.sprites, strict=True)
    )
    c0, c1 = start.camera, end.camera
    camera = Camera(_lerp(c0.x, c1.x, t), _lerp(c0.y, c1.y, t), _lerp(c0.zoom, c1.zoom, t, True))
    return replace(start, sprites=sprites, camera=camera)


def make_clip(
    rng_or_seed: np.random.Generator | int,
    num_frames: int = 16,
    size: int = 64,
    kind: str | None = None,
) -> tuple[np.ndarray, str, dict]:
    """A clip: (num_frames, size, size, 3) uint8 frames, its caption, and what made it.

    ``kind=None`` picks one of ``OBJECT_KINDS``. ``meta`` holds ``kind``, ``direction`` and
    ``speed`` (for "move"; else None) and ``scenes``, the scene of every frame.
    """
    rng = as_rng(rng_or_seed)
    kind = pick(rng, OBJECT_KINDS) if kind is None else kind
    start, end, words = _plan(rng, kind)
    times = np.linspace(0, 1, num_frames) if num_frames > 1 else np.zeros(1)
    scenes = [interpolate(start, end, float(t)) for t in times]
    frames = np.stack([render(scene, size) for scene in scenes])
    meta = {"kind": kind, "direction": None, "speed": None, **words, "scenes": scenes}
    return frames, caption(start, kind, **words), meta
