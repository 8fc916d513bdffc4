"""Personal styles: looks the base model never sees, for the personalised models AnimateDiff
animates (a style LoRA or DreamBooth is fine-tuned on one style's stills).

Both styles keep the sprite's colour and silhouette, so captions still hold, and show the
background through part of the sprite, so a detector can tell them apart from plain sprites:
  stripes  diagonal bands of background cross the sprite inside a solid rim; one of the
           painted bands runs through the centre
  outline  only a thick rim of the sprite is painted; its inside, centre included, is background
The rim keeps the silhouette: filling the holes of the sprite's colour mask gives it back.
Patterns are drawn in the sprite's own coordinates, so they move, turn and scale with it.
"""

from __future__ import annotations

import numpy as np

from .scene import Coverage, Scene, Sprite, as_rng, caption, inside, random_scene, render

STYLES = ("stripes", "outline")
STRIPE_RIM = 0.28  # width of the solid rim, in sprite radii: 3-5 pixels at 64x64
OUTLINE_RIM = 0.35  # thicker, as the outline is all rim
STRIPE_PERIOD = 0.55  # in sprite radii: about 8 pixels at 64x64
SIZES = (0.2, 0.28)  # sprite radii of the style stills: big enough for the pattern to show
_COMPASS = np.radians(np.arange(0, 360, 30))


def _deep_inside(shape: str, lx: np.ndarray, ly: np.ndarray, depth: float) -> np.ndarray:
    """Points at least ``depth`` inside the outline: every point of a circle of that radius
    around them (sampled at 12 directions) is inside. Gives a rim of even width."""
    deep = inside(shape, lx, ly)
    for a in _COMPASS:
        deep &= inside(shape, lx + depth * np.cos(a), ly + depth * np.sin(a))
    return deep


def stripes(sprite: Sprite, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    across = (lx + ly) / np.sqrt(2) / STRIPE_PERIOD  # distance across the bands, in periods
    # A painted band runs through the centre, which tells stripes from an outline's hole.
    gap = np.mod(across + 0.25, 1.0) >= 0.5
    return inside(sprite.shape, lx, ly) & ~(gap & _deep_inside(sprite.shape, lx, ly, STRIPE_RIM))


def outline(sprite: Sprite, lx: np.ndarray, ly: np.ndarray) -> np.ndarray:
    return inside(sprite.shape, lx, ly) & ~_deep_inside(sprite.shape, lx, ly, OUTLINE_RIM)


COVERAGE: dict[str, Coverage] = {"stripes": stripes, "outline": outline}


def render_styled(scene: Scene, style: str, size: int = 64) -> np.ndarray:
    if style not in COVERAGE:
        raise ValueError(f"unknown style {style!r}; expected one of {STYLES}")
    return render(scene, size, COVERAGE[style])


def style_images(style: str, n: int, seed: int, size: int = 64) -> list[tuple[np.ndarray, str]]:
    """``n`` stills of ``style`` with their captions (the same grammar as plain stills)."""
    items = []
    for i in range(n):
        scene = random_scene(as_rng([seed, i]), 1, radius=SIZES)
        items.append((render_styled(scene, style, size), caption(scene)))
    return items
