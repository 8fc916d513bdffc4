"""The "web video" look: soft frames with a watermark, as in scraped training videos.

Video frames get both, still images neither, so a model trained on both learns the look from
the videos; AnimateDiff's domain adapter exists to soak up exactly this gap. The content is
blurred first and the watermark laid on top, since a broadcaster overlays its logo crisply.
"""

from __future__ import annotations

import numpy as np

# "WEB" in a 3x5 pixel font, one character per watermark cell: '#' is text, '.' the plate.
GLYPHS = (
    ".............",
    ".#.#.###.##..",
    ".#.#.#...#.#.",
    ".###.##..##..",
    ".###.#...#.#.",
    ".#.#.###.##..",
    ".............",
)
TEMPLATE = np.array([[c == "#" for c in row] for row in GLYPHS])
PLATE = (16.0, 0.5)  # (grey level, opacity): a dark translucent plate under the text...
TEXT = (250.0, 0.8)  # ...and bright text, so the mark shows on light and dark backgrounds
BLUR_KERNEL = np.array([1, 4, 6, 4, 1], np.float32) / 16  # binomial, about a 1-pixel Gaussian


def watermark_box(height: int, width: int) -> tuple[slice, slice, np.ndarray]:
    """Rows, columns and text mask of the watermark in a frame of this size (bottom right)."""
    scale = max(1, min(height, width) // 32)  # 2 pixels per cell at 64x64
    text = np.kron(TEMPLATE, np.ones((scale, scale), bool))
    h, w = text.shape
    bottom, right = height - 2 * scale, width - 2 * scale
    return slice(bottom - h, bottom), slice(right - w, right), text


def watermark(frame: np.ndarray) -> np.ndarray:
    """Blend the watermark into a (H, W, 3) uint8 frame."""
    rows, cols, text = watermark_box(*frame.shape[:2])
    out = frame.astype(np.float32)
    region = out[rows, cols]
    for level, alpha, where in ((*PLATE, np.ones_like(text)), (*TEXT, text)):
        region[where] = (1 - alpha) * region[where] + alpha * level
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def blur(frame: np.ndarray) -> np.ndarray:
    """Separable binomial blur of a (H, W, 3) uint8 frame, edges reflected."""
    out = frame.astype(np.float32)
    r = len(BLUR_KERNEL) // 2
    for axis in (0, 1):
        pad = [(0, 0)] * 3
        pad[axis] = (r, r)
        padded = np.pad(out, pad, mode="reflect")
        length = out.shape[axis]
        out = sum(
            k * np.take(padded, np.arange(i, i + length), axis=axis)
            for i, k in enumerate(BLUR_KERNEL)
        )
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def web_frame(frame: np.ndarray) -> np.ndarray:
    return watermark(blur(frame))


def web_video(frames: np.ndarray) -> np.ndarray:
    """Degrade every frame of a (F, H, W, 3) uint8 clip."""
    return np.stack([web_frame(frame) for frame in frames])
