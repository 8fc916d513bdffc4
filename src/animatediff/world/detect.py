"""Detectors for the miniature world, to score what a model generates against its caption.

Frames are (H, W, 3) or clips (F, H, W, 3), uint8 in [0, 255] or float in [0, 1]; a torch
video as ``read_video`` returns it, (3, F, H, W) float, is accepted too. Positions are
fractions of the frame (x right, y down) and areas fractions of its pixels, so scores do not
depend on the resolution. Every decision is by nearest palette colour plus a little
morphology, which survives the blur of a small model as long as the colours stay roughly right.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from .domain import watermark_box
from .motion import DISTANCE, GROWTH, PAN, PAN_LEFT_DX, STEP, TURN, ZOOM
from .scene import COLOURS, SYMMETRY, parse_caption

NAMES = tuple(COLOURS)
PALETTE = np.array([COLOURS[name] for name in NAMES], np.float32)
MIN_AREA = 0.004  # an object smaller than this fraction of the frame is not there
CIRCLE_MAX = 0.08  # rotational harmonics weaker than this make a circle (see classify_shape)
HARMONICS = {3: "triangle", 4: "square", 5: "star"}
WATERMARK_MIN = 0.5  # correlation with the watermark template above which it is there
# Grey levels by which a pixel must differ to count as changed: well above codec noise.
CHANGED = 40


# --- input and morphology -------------------------------------------------------------------


def as_frames(x) -> np.ndarray:
    """uint8 RGB with channels last from any accepted layout (so converting twice is harmless)."""
    a = np.asarray(x)
    if a.ndim == 4 and a.shape[0] == 3 and a.shape[-1] != 3:  # torch video (3, F, H, W)
        a = a.transpose(1, 2, 3, 0)
    if a.ndim not in (3, 4) or a.shape[-1] != 3:
        raise ValueError(f"expected (H, W, 3) or (F, H, W, 3) frames, got shape {a.shape}")
    if a.dtype.kind == "f":
        a = np.clip(np.rint(a * 255), 0, 255)
    return a.astype(np.uint8)


def _window(mask: np.ndarray, r: int, axis: int, reduce: Callable) -> np.ndarray:
    pad = [(0, 0), (0, 0)]
    pad[axis] = (r, r)
    windows = np.lib.stride_tricks.sliding_window_view(np.pad(mask, pad), 2 * r + 1, axis=axis)
    return reduce(windows, axis=-1)


def dilate(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Grow by a (2r+1)-square, one axis at a time (a square kernel is separable)."""
    for axis in (0, 1):
        mask = _window(mask, r, axis, np.any)
    return mask


def erode(mask: np.ndarray, r: int = 1) -> np.ndarray:
    """Shrink by a (2r+1)-square; outside the frame counts as empty."""
    for axis in (0, 1):
        mask = _window(mask, r, axis, np.all)
    return mask


def _spread(reached: np.ndarray, free: np.ndarray) -> np.ndarray:
    """Reach every free pixel whose run of free pixels along its row holds a reached one."""
    h, w = free.shape
    runs = np.cumsum(~free, axis=1) + (w + 1) * np.arange(h)[:, None]  # run id per pixel
    hit = np.bincount(runs[reached], minlength=(w + 1) * h) > 0
    return hit[runs] & free


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """The mask plus every empty region that does not reach the frame's edge."""
    free = ~mask
    outside = np.zeros_like(mask)
    outside[[0, -1], :], outside[:, [0, -1]] = free[[0, -1], :], free[:, [0, -1]]
    while True:  # flood from the edge along rows, then columns, until nothing new is reached
        grown = _spread(_spread(outside, free).T, free.T).T
        if (grown == outside).all():
            return ~outside
        outside = grown


def clean(mask: np.ndarray) -> np.ndarray:
    """Opening by a 3x3 square: drops the thin rims of in-between colours that anti-aliasing
    and blur leave where two colours meet (red and blue edges pass for purple)."""
    return dilate(erode(mask))


# --- colours --------------------------------------------------------------------------------


def labels(frame) -> np.ndarray:
    """Index into ``NAMES`` of each pixel's nearest palette colour."""
    rgb = as_frames(frame).astype(np.float32)
    return ((rgb[..., None, :] - PALETTE) ** 2).sum(-1).argmin(-1)


def segment(frame, colour: str) -> np.ndarray:
    """Bool mask of the pixels nearest to palette ``colour``."""
    return labels(frame) == NAMES.index(colour)


def background_colour(frame) -> str:
    """The commonest palette colour on the frame's border (the watermark sits inside it)."""
    lab = labels(frame)
    border = np.concatenate(
        [lab[:2].ravel(), lab[-2:].ravel(), lab[:, :2].ravel(), lab[:, -2:].ravel()]
    )
    return NAMES[np.bincount(border, minlength=len(NAMES)).argmax()]


def _visible(frame: np.ndarray) -> np.ndarray:
    """Where objects can be judged: everywhere but under a watermark, if there is one."""
    valid = np.ones(frame.shape[:2], bool)
    if has_watermark(frame):
        rows, cols, _ = watermark_box(*frame.shape[:2])
        valid[rows, cols] = False
    return valid


def object_mask(frame, colour: str) -> np.ndarray:
    """Cleaned mask of ``colour``, ignoring the watermark."""
    rgb = as_frames(frame)
    return clean(segment(rgb, colour)) & _visible(rgb)


def dominant_object(frame, background: str | None = None) -> tuple[str | None, np.ndarray]:
    """The colour covering most of the frame apart from the background, and its mask
    (None and an empty mask when nothing but background is there)."""
    rgb = as_frames(frame)
    background = background or background_colour(rgb)
    lab, valid = labels(rgb), _visible(rgb)
    best, best_mask = None, np.zeros(rgb.shape[:2], bool)
    for i, name in enumerate(NAMES):
        mask = clean(lab == i) & valid
        if name != background and mask.mean() >= MIN_AREA and mask.sum() > best_mask.sum():
            best, best_mask = name, mask
    return best, best_mask


# --- shape ----------------------------------------------------------------------------------


def _moments(mask: np.ndarray) -> dict[int, complex]:
    """Normalised complex moments sum(z^k) / sum(|z|^k) about the centroid, z = x + iy.

    A shape with k-fold symmetry has them only at multiples of k, so a triangle shows k=3, a
    square k=4, a five-pointed star k=5 and a circle none; their size does not depend on the
    rotation, and their phase turns by k times the rotation.
    """
    ys, xs = np.nonzero(mask)
    z = (xs - xs.mean()) + 1j * (ys - ys.mean())
    r = np.abs(z)
    return {k: complex((z**k).sum() / max((r**k).sum(), 1e-9)) for k in HARMONICS}


def classify_shape(mask: np.ndarray) -> str:
    """'circle', 'square', 'triangle' or 'star' for an object mask ('none' if too small).

    Holes are filled first, so outlined and striped sprites classify like solid ones.
    """
    mask = fill_holes(mask)
    if mask.mean() < MIN_AREA:
        return "none"
    strength = {k: abs(m) for k, m in _moments(mask).items()}
    k = max(strength, key=strength.get)
    return "circle" if strength[k] < CIRCLE_MAX else HARMONICS[k]


def orientation(mask: np.ndarray, shape: str) -> float:
    """Rotation of a non-circular shape in degrees (clockwise on screen), modulo its symmetry."""
    k = {v: k for k, v in HARMONICS.items()}[shape]
    return math.degrees(np.angle(_moments(fill_holes(mask))[k])) / k


# --- tracking and motion --------------------------------------------------------------------

Track = list[tuple[float, float, float]]


def track(frames, colour: str | None = None) -> Track:
    """(x, y, area) of the ``colour`` object in every frame; NaN position where it is absent.

    ``colour=None`` follows the dominant object of the first frame.
    """
    clip = as_frames(frames)
    colour = colour or dominant_object(clip[0])[0]
    out = []
    for frame in clip:
        mask = object_mask(frame, colour) if colour else np.zeros(frame.shape[:2], bool)
        h, w = mask.shape
        area = float(mask.mean())
        if area < MIN_AREA:
            out.append((math.nan, math.nan, area))
            continue
        ys, xs = np.nonzero(mask)
        out.append(((xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h, area))
    return out


def displacement(path: Track) -> tuple[float, float, float]:
    """(dx, dy, area ratio) from the first to the last point of a track."""
    (x0, y0, a0), (x1, y1, a1) = path[0], path[-1]
    return x1 - x0, y1 - y0, a1 / a0 if a0 > 0 else math.nan


def motion_smoothness(path: Track, tolerance: float = 0.015) -> float:
    """1 - (acceleration energy / (acceleration + velocity energy)) of the centroid.

    Steady motion scores 1 and random jumps about 0.25. ``tolerance`` (frame widths per frame,
    about a pixel at 64x64) is added to the velocity energy, so that the centroid jitter of a
    turning or growing sprite, which stays put, does not count as jerky motion. A track that
    loses the object scores 0.
    """
    p = np.array([(x, y) for x, y, _ in path])
    if len(p) < 3 or np.isnan(p).any():
        return 0.0
    v, acc = np.diff(p, axis=0), np.diff(p, n=2, axis=0)
    ea, ev = (acc**2).sum(), (v**2).sum() + len(v) * tolerance**2
    return float(1 - ea / (ea + ev))


def temporal_consistency(frames) -> float:
    """How well the first frame's object keeps its identity, in [0, 1].

    The fraction of frames whose dominant object has the first frame's colour and shape, times
    the mean IoU of consecutive masks of that colour, each pair aligned on its centroids so that
    motion costs nothing. About 0.9 or more for the world's clips; a cut to another scene
    midway roughly halves it, a flickering object lowers the IoU.
    """
    clip = as_frames(frames)
    objects = [dominant_object(frame) for frame in clip]
    colour, first = objects[0]
    if colour is None:
        return 0.0
    identity = (colour, classify_shape(first))
    same = np.mean([(c, classify_shape(m)) == identity for c, m in objects])
    masks = [object_mask(frame, colour) for frame in clip]
    ious = []
    for a, b in zip(masks, masks[1:]):
        if not a.any() or not b.any():
            ious.append(0.0)
            continue
        (ya, xa), (yb, xb) = (np.argwhere(m).mean(0) for m in (a, b))
        b = np.roll(b, (round(ya - yb), round(xa - xb)), axis=(0, 1))
        ious.append(float((a & b).sum() / (a | b).sum()))
    return float(same * (np.mean(ious) if ious else 1.0))


def changed_fraction(frames) -> float:
    """Largest fraction of pixels, over frames, that differ clearly from the first frame."""
    clip = as_frames(frames)
    diff = np.abs(clip.astype(np.int16) - clip[:1]).max(-1)  # (F, H, W)
    return float((diff > CHANGED).mean(axis=(1, 2)).max())


def is_dynamic(frames, min_shift: float = 0.03, min_growth: float = 1.15) -> bool:
    """Whether anything moves: the dominant object shifts or changes size, or (for turning
    and camera motion) a visible share of the pixels changes."""
    path = track(frames)
    if not np.isnan([p[0] for p in path]).any():
        dx, dy, ratio = displacement(path)
        if math.hypot(dx, dy) > min_shift or max(ratio, 1 / ratio) > min_growth:
            return True
    return changed_fraction(frames) > 0.01


def dynamic_degree(videos) -> float:
    """Fraction of the videos that move (VBench's "dynamic degree")."""
    return float(np.mean([is_dynamic(v) for v in videos]))


# --- watermark ------------------------------------------------------------------------------


def watermark_score(frame) -> float:
    """Correlation of the brightness in the watermark's box with its text pattern (mean over
    frames for a clip): about 1 with the watermark, about 0 without."""
    rgb = as_frames(frame)
    if rgb.ndim == 4:
        return float(np.mean([watermark_score(f) for f in rgb]))
    rows, cols, text = watermark_box(*rgb.shape[:2])
    bright = rgb[rows, cols].astype(np.float32).mean(-1).ravel()
    pattern = text.ravel().astype(np.float32)
    if bright.std() < 1e-3:
        return 0.0
    return float(np.corrcoef(bright, pattern)[0, 1])


def has_watermark(frame) -> bool:
    return watermark_score(frame) > WATERMARK_MIN


# --- style ----------------------------------------------------------------------------------


def style_features(frame) -> tuple[float, float]:
    """(hole fraction, centre fill) of the dominant object.

    Holes are background enclosed by the object's colour: none for a plain sprite, the middle
    for an outline, bands for stripes. Centre fill is how much of a small disc at the centre of
    the filled silhouette has the object's colour: a painted band of stripes runs through the
    centre, an outline's hole covers it.
    """
    rgb = as_frames(frame)
    if rgb.ndim == 4:
        feats = np.array([style_features(f) for f in rgb])
        return float(feats[:, 0].mean()), float(feats[:, 1].mean())
    _, mask = dominant_object(rgb)
    filled = fill_holes(mask)
    if not filled.any():
        return 0.0, 0.0
    ys, xs = np.nonzero(filled)
    radius = max(1.0, 0.15 * math.sqrt(len(ys) / math.pi))
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    centre = (yy - ys.mean()) ** 2 + (xx - xs.mean()) ** 2 <= radius**2
    holes = filled & ~mask
    return float(holes.sum() / filled.sum()), float(mask[centre].mean())


def style_scores(frame) -> dict[str, float]:
    """How much the frame looks like each style ('plain', 'stripes', 'outline'), in [0, 1]."""
    holes, centre = style_features(frame)
    hollow = min(holes / 0.1, 1.0)  # both styles open well over a tenth of the silhouette
    return {"plain": 1 - hollow, "stripes": hollow * centre, "outline": hollow * (1 - centre)}


def style_score(frame, style: str) -> float:
    scores = style_scores(frame)
    if style not in scores:
        raise ValueError(f"unknown style {style!r}; expected one of {tuple(scores)}")
    return scores[style]


def classify_style(frame) -> str:
    """'plain', 'stripes' or 'outline', whichever scores highest."""
    scores = style_scores(frame)
    return max(scores, key=scores.get)


# --- captions -------------------------------------------------------------------------------


def alignment_checks(frame, caption: str) -> dict[str, bool]:
    """Each claim of the caption about a frame: every "COLOUR SHAPE" and the background."""
    rgb = as_frames(frame)
    parsed = parse_caption(caption)
    checks = {}
    for colour, shape in parsed.objects:
        checks[f"{colour} {shape}"] = classify_shape(object_mask(rgb, colour)) == shape
    if parsed.background:
        checks[f"{parsed.background} background"] = background_colour(rgb) == parsed.background
    return checks


def text_alignment(frame, caption: str) -> float:
    """1 if every object and background the caption names is in the frame, else 0; for a
    clip, the fraction of frames where that holds."""
    rgb = as_frames(frame)
    if rgb.ndim == 4:
        return float(np.mean([text_alignment(f, caption) for f in rgb]))
    checks = alignment_checks(rgb, caption)
    return float(bool(checks) and all(checks.values()))


def motion_alignment(frames, caption: str) -> float:
    """1 if the clip's first-named object (or camera) moves as the caption says, else 0.

    Thresholds are half of what the training clips do: a move of half the slow distance in
    the right direction, half the growth, zoom or pan, a third of the turn.
    """
    parsed = parse_caption(caption)
    clip = as_frames(frames)
    if parsed.kind == "static":
        return float(not is_dynamic(clip))
    colour = parsed.objects[0][0] if parsed.objects else None
    path = track(clip, colour)
    if np.isnan([p[0] for p in path]).any():
        return 0.0
    dx, dy, ratio = displacement(path)
    if parsed.kind == "move":
        sx, sy = STEP.get(parsed.direction, (0, 0))
        return float(dx * sx + dy * sy > DISTANCE["slowly"] / 2)
    if parsed.kind in ("grow", "zoom-in"):
        growth = GROWTH if parsed.kind == "grow" else ZOOM
        return float(ratio > growth)  # the area grows by growth**2; half of that, in log scale
    if parsed.kind == "shrink":
        return float(ratio < 1 / GROWTH)
    if parsed.kind == "pan-left":
        return float(dx * PAN_LEFT_DX > PAN / 2)
    if parsed.kind == "turn":
        shape = parsed.objects[0][1]
        if shape not in SYMMETRY:
            return 0.0
        period = SYMMETRY[shape]
        angles = [orientation(object_mask(f, colour), shape) for f in clip]
        turned = np.unwrap(np.radians(angles), period=math.radians(period))
        return float(math.degrees(turned[-1] - turned[0]) > TURN * period / 3)
    return 0.0
