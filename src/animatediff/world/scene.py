"""Scenes of the miniature world: coloured shapes on faintly textured backgrounds, and captions.

Coordinates are fractions of the frame: x to the right, y downwards, (0.5, 0.5) the centre. A
sprite's ``size`` is its radius in frame widths; ``angle`` is in degrees, and a positive angle
turns it clockwise on screen (y points down). A camera maps world to screen, so zooming and
panning move the background texture too, which is what makes camera motion visible.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# Object and background colours are far apart in RGB so nearest-colour segmentation is reliable.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 210, 40),
    "white": (235, 235, 235),
    "purple": (140, 50, 180),
    "black": (25, 25, 25),
}
OBJECT_COLOURS = ("red", "green", "blue", "yellow", "white", "purple")
BACKGROUND_COLOURS = ("black", "white", "blue", "green")
SHAPES = ("circle", "square", "triangle", "star")

# Motion words live here too, so that the whole caption grammar (and its vocabulary) is one file.
DIRECTIONS = ("left", "right", "up", "down")
SPEEDS = ("slowly", "quickly")
VERBS = {"grow": "growing", "shrink": "shrinking", "turn": "turning"}
CAMERA_PHRASES = {"zoom-in": "zooming in on", "pan-left": "panning left over"}
# Every word a caption can hold, for a word-level tokenizer.
VOCABULARY = list(dict.fromkeys([
    "a", "and", "on", "background", *COLOURS, *SHAPES, "moving", *DIRECTIONS, *SPEEDS,
    *VERBS.values(), *" ".join(CAMERA_PHRASES.values()).split(),
]))  # fmt: skip

SUPERSAMPLE = 4  # samples per pixel along each axis, averaged for anti-aliasing
TEXTURE_AMPLITUDE = 12.0  # grey levels: faint enough to keep the background's palette colour
MARGIN = 0.02  # gap between a sprite's extent and the frame edge, in frame widths


def _regular(n: int, radius: float, first: float) -> np.ndarray:
    angles = first + 2 * np.pi * np.arange(n) / n
    return radius * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _star(points: int, outer: float, inner: float) -> np.ndarray:
    vertices = _regular(2 * points, 1.0, -np.pi / 2)
    return vertices * np.tile([outer, inner], points)[:, None]


# Polygons in units of the sprite's size, first vertex up; sized to look about as big as the circle.
POLYGONS = {
    "square": _regular(4, 0.85 * math.sqrt(2), -np.pi / 4),
    "triangle": _regular(3, 1.35, -np.pi / 2),
    "star": _star(5, 1.35, 0.6),
}
EXTENT = {"circle": 1.0, "square": 0.85 * math.sqrt(2), "triangle": 1.35, "star": 1.35}
SYMMETRY = {"square": 90.0, "triangle": 120.0, "star": 72.0}  # degrees; a circle has no turn


@dataclass(frozen=True)
class Sprite:
    shape: str
    colour: str
    x: float = 0.5
    y: float = 0.5
    size: float = 0.2
    angle: float = 0.0


@dataclass(frozen=True)
class Camera:
    x: float = 0.5  # world point at the centre of the frame
    y: float = 0.5
    zoom: float = 1.0  # > 1 magnifies about the frame centre


@dataclass(frozen=True)
class Scene:
    sprites: tuple[Sprite, ...]
    background: str
    camera: Camera = field(default_factory=Camera)


# --- rendering ------------------------------------------------------------------------------


def inside(shape: str, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    """Whether local points (in sprite radii, sprite unrotated) lie inside ``shape``."""
    if shape == "circle":
        return lx * lx + ly * ly <= 1.0
    # Every polygon here is star-shaped about its centre: a point is inside when it is nearer
    # than the edge its ray from the centre crosses, which handles the non-convex star too.
    vertices = POLYGONS[shape]
    angles = np.arctan2(vertices[:, 1], vertices[:, 0])
    order = np.argsort(angles)
    vertices, angles = vertices[order], angles[order]
    theta = np.arctan2(ly, lx)
    j = np.searchsorted(angles, theta) - 1  # -1 wraps to the last edge
    p1, p2 = vertices[j % len(vertices)], vertices[(j + 1) % len(vertices)]
    d = p2 - p1
    ux, uy = np.cos(theta), np.sin(theta)
    # The ray t*u meets the edge p1 + s*d at t = (p1 x d) / (u x d).
    t = (p1[..., 0] * d[..., 1] - p1[..., 1] * d[..., 0]) / (ux * d[..., 1] - uy * d[..., 0])
    return lx * lx + ly * ly <= t * t


Coverage = Callable[[Sprite, np.ndarray, np.ndarray], np.ndarray]


def plain(sprite: Sprite, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    return inside(sprite.shape, lx, ly)


def texture(wx: np.ndarray, wy: np.ndarray) -> np.ndarray:
    """A smooth pattern in [-1, 1]: two plane waves of unrelated frequency, so it never repeats
    over a pan and a zoom visibly stretches it."""
    a = np.sin(2 * np.pi * (3.1 * wx + 1.3 * wy))
    b = np.sin(2 * np.pi * (-1.7 * wx + 2.9 * wy + 0.25))
    return 0.5 * (a + b)


def render(scene: Scene, size: int = 64, coverage: Coverage = plain) -> np.ndarray:
    """Render ``scene`` as a (size, size, 3) uint8 image; ``coverage`` decides which points of
    a sprite take its colour (styles replace it). Each pixel averages SUPERSAMPLE**2 samples."""
    n = size * SUPERSAMPLE
    s = (np.arange(n, dtype=np.float32) + 0.5) / n
    sx, sy = np.meshgrid(s, s)  # screen sample positions, rows are y
    cam = scene.camera
    wx, wy = cam.x + (sx - 0.5) / cam.zoom, cam.y + (sy - 0.5) / cam.zoom
    image = np.empty((n, n, 3), np.float32)
    image[:] = COLOURS[scene.background]
    image += TEXTURE_AMPLITUDE * texture(wx, wy)[..., None]
    for sprite in scene.sprites:
        window = _window(sprite, cam, n)  # only samples near the sprite can be covered
        a = math.radians(sprite.angle)
        dx, dy = (wx[window] - sprite.x) / sprite.size, (wy[window] - sprite.y) / sprite.size
        lx, ly = math.cos(a) * dx + math.sin(a) * dy, -math.sin(a) * dx + math.cos(a) * dy
        image[window][coverage(sprite, lx, ly)] = COLOURS[sprite.colour]
    image = image.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, 3).mean(axis=(1, 3))
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def _window(sprite: Sprite, cam: Camera, n: int) -> tuple[slice, slice]:
    """Sample rows and columns that the sprite's bounding circle can reach on screen."""
    half = EXTENT[sprite.shape] * sprite.size * cam.zoom

    def span(world: float, centre: float) -> slice:
        screen = 0.5 + (world - centre) * cam.zoom
        lo, hi = math.floor((screen - half) * n), math.ceil((screen + half) * n) + 1
        return slice(min(max(lo, 0), n), min(max(hi, 0), n))

    return span(sprite.y, cam.y), span(sprite.x, cam.x)


# --- random scenes --------------------------------------------------------------------------


def as_rng(rng_or_seed: np.random.Generator | int | Sequence[int]) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def pick(rng: np.random.Generator, options: tuple[str, ...] | list[str]) -> str:
    return options[int(rng.integers(len(options)))]


def random_scene(
    rng: np.random.Generator,
    num_sprites: int | None = None,
    radius: tuple[float, float] = (0.18, 0.28),
    pad: tuple[float, float] = (0.0, 0.0),
    shapes: tuple[str, ...] = SHAPES,
    colours: tuple[str, ...] = OBJECT_COLOURS,
    backgrounds: tuple[str, ...] = BACKGROUND_COLOURS,
) -> Scene:
    """A scene of one or two sprites (different colours, not overlapping) fully in frame.

    ``pad`` keeps sprites that much further from the x / y edges, room for them to move.
    Two sprites are 3/4 the size; if they do not fit after a few tries there is only one.
    """
    if num_sprites is None:
        num_sprites = 2 if rng.random() < 0.3 else 1
    background = pick(rng, backgrounds)
    colours = tuple(c for c in colours if c != background)
    scale = 0.75 if num_sprites == 2 else 1.0
    for _ in range(100):
        sprites: list[Sprite] = []
        for _ in range(num_sprites):
            shape = pick(rng, shapes)
            colour = pick(rng, tuple(c for c in colours if c not in {s.colour for s in sprites}))
            size = scale * rng.uniform(*radius)
            extent = EXTENT[shape] * size + MARGIN
            x = rng.uniform(extent + pad[0], 1 - extent - pad[0])
            y = rng.uniform(extent + pad[1], 1 - extent - pad[1])
            angle = rng.uniform(0, SYMMETRY.get(shape, 360.0))
            sprites.append(Sprite(shape, colour, x, y, size, angle))
        if len(sprites) < 2 or _apart(*sprites):
            return Scene(tuple(sprites), background)
    return random_scene(rng, 1, radius, pad, shapes, colours, backgrounds)


def _apart(a: Sprite, b: Sprite) -> bool:
    reach = EXTENT[a.shape] * a.size + EXTENT[b.shape] * b.size + MARGIN
    return math.hypot(a.x - b.x, a.y - b.y) > reach


# --- captions -------------------------------------------------------------------------------


def describe(sprite: Sprite) -> str:
    return f"a {sprite.colour} {sprite.shape}"


def caption(
    scene: Scene, kind: str = "static", direction: str | None = None, speed: str | None = None
) -> str:
    """The caption of a still (``kind="static"``) or of a clip that starts at ``scene``.

    Grammar, where SUBJECT is "a COLOUR SHAPE" or "a COLOUR SHAPE and a COLOUR SHAPE":
      static     SUBJECT on a COLOUR background
      move       a COLOUR SHAPE moving DIRECTION SPEED [and ...] on a COLOUR background
      grow, shrink, turn
                 a COLOUR SHAPE growing|shrinking|turning [and ...] on a COLOUR background
      zoom-in    zooming in on SUBJECT on a COLOUR background
      pan-left   panning left over SUBJECT on a COLOUR background
    Only the first sprite moves in object motions.
    """
    if kind not in ("static", "move", *VERBS, *CAMERA_PHRASES):
        raise ValueError(f"unknown motion kind {kind!r}")
    parts = [describe(s) for s in scene.sprites]
    if kind == "move":
        parts[0] += f" moving {direction} {speed}"
    elif kind in VERBS:
        parts[0] += f" {VERBS[kind]}"
    subject = " and ".join(parts)
    if kind in CAMERA_PHRASES:
        subject = f"{CAMERA_PHRASES[kind]} {subject}"
    return f"{subject} on a {scene.background} background"


@dataclass(frozen=True)
class Parsed:
    objects: tuple[tuple[str, str], ...]  # (colour, shape), in caption order
    background: str | None
    kind: str
    direction: str | None = None


def parse_caption(text: str) -> Parsed:
    """Read back what ``caption`` wrote; unknown words are ignored."""
    words = text.lower().replace(",", " ").split()
    objects = tuple(
        (words[i - 1], w)
        for i, w in enumerate(words)
        if w in SHAPES and i > 0 and words[i - 1] in COLOURS
    )
    background = None
    if "background" in words and words.index("background") > 0:
        background = words[words.index("background") - 1]
        background = background if background in COLOURS else None
    direction = None
    camera = [k for k, phrase in CAMERA_PHRASES.items() if phrase.split()[0] in words]
    if camera:
        kind = camera[0]
    elif "moving" in words:
        kind = "move"
        direction = next((w for w in words if w in DIRECTIONS), None)
    else:
        kind = next((k for k, verb in VERBS.items() if verb in words), "static")
    return Parsed(objects, background, kind, direction)
