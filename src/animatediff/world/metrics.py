"""The clip metrics of the evaluation (``evaluate``'s docstring defines each), measured with the
world's detectors on uint8 clips: numpy only."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .detect import (
    MIN_AREA,
    as_frames,
    background_colour,
    classify_shape,
    has_watermark,
    is_dynamic,
    motion_alignment,
    motion_smoothness,
    object_mask,
    style_scores,
    temporal_consistency,
    track,
)
from .motion import PAN_LEFT_DX
from .scene import parse_caption
from .styles import STYLES

STILLS_MIN = 1e-6  # a stills style score below this makes the domain similarity undefined

Clip = np.ndarray  # (F, H, W, 3) uint8


def _mean(values: Iterable) -> float | None:
    values = [float(v) for v in values]
    return float(np.mean(values)) if values else None


def frame_alignment(frame, text: str) -> dict[str, bool]:
    """Which claims of the caption hold in one frame: ``colour`` (every named colour covers an
    object), ``shape`` (each has its named shape), ``background``, and ``all`` of them."""
    rgb = as_frames(frame)
    parsed = parse_caption(text)
    colour = shape = True
    for name, form in parsed.objects:
        mask = object_mask(rgb, name)
        colour = colour and bool(mask.mean() >= MIN_AREA)
        shape = shape and classify_shape(mask) == form
    background = parsed.background is None or background_colour(rgb) == parsed.background
    ok = bool(parsed.objects) or parsed.background is not None
    return {
        "colour": colour,
        "shape": shape,
        "background": background,
        "all": ok and colour and shape and background,
    }


def clip_alignment(frames, text: str) -> dict[str, bool]:
    """Each claim of ``frame_alignment`` for a clip: true when it holds in most frames."""
    checks = [frame_alignment(f, text) for f in as_frames(frames)]
    return {k: float(np.mean([c[k] for c in checks])) > 0.5 for k in checks[0]}


def _majority_background(frames) -> list[bool]:
    """Per frame: is its background colour the clip's commonest?"""
    colours = [background_colour(f) for f in as_frames(frames)]
    commonest = max(set(colours), key=colours.count)
    return [c == commonest for c in colours]


def watermark_rate(frames: Iterable) -> float | None:
    """Share of frames with a watermark (``detect.has_watermark``)."""
    return _mean(has_watermark(f) for f in frames)


def clip_metrics(clips: Sequence, captions: Sequence[str]) -> dict:
    """The clip metrics of the module docstring over clips and their captions."""
    if len(clips) != len(captions):
        raise ValueError(f"{len(clips)} clips for {len(captions)} captions")
    clips = [as_frames(c) for c in clips]
    aligned = [clip_alignment(c, t) for c, t in zip(clips, captions)]
    kinds = [parse_caption(t).kind for t in captions]
    motion = [motion_alignment(c, t) for c, t in zip(clips, captions)]
    frames = [f for c in clips for f in c]
    styles = [style_scores(f) for f in frames]
    names = list(styles[0]) if styles else ["plain", *STYLES]
    return {
        "clips": len(clips),
        "text_alignment": _mean(a["all"] for a in aligned),
        "colour_alignment": _mean(a["colour"] for a in aligned),
        "shape_alignment": _mean(a["shape"] for a in aligned),
        "background_alignment": _mean(a["background"] for a in aligned),
        "background_stability": _mean(f for c in clips for f in _majority_background(c)),
        "temporal_consistency": _mean(temporal_consistency(c) for c in clips),
        "motion_smoothness": _mean(motion_smoothness(track(c)) for c in clips),
        "dynamic_degree": _mean(is_dynamic(c) for c in clips),
        "motion_alignment": _mean(motion),
        "motion_alignment_by_kind": {
            k: _mean(m for m, kind in zip(motion, kinds) if kind == k) for k in dict.fromkeys(kinds)
        },
        "watermark_rate": watermark_rate(frames),
        "style_scores": {s: _mean(d[s] for d in styles) for s in names},
        "style_rate": {s: _mean(max(d, key=d.get) == s for d in styles) for s in names},
    }


def domain_similarity(metrics: Mapping, stills: Mapping, style: str | None) -> dict:
    """Style score of a row's frames, of the same model's stills, and their ratio."""
    if style is None:
        return {"style_score": None, "style_score_stills": None, "domain_similarity": None}
    score = metrics["style_scores"].get(style)
    reference = stills["style_scores"].get(style)
    ratio = None
    if score is not None and reference is not None and reference >= STILLS_MIN:
        ratio = score / reference
    return {"style_score": score, "style_score_stills": reference, "domain_similarity": ratio}


def camera_motion(clips: Sequence, captions: Sequence[str]) -> dict:
    """MotionLoRA metrics of the module docstring: area ratio and x displacement of the
    caption's first-named object from the first to the last frame."""
    ratios, dxs = [], []
    for clip, text in zip(clips, captions):
        parsed = parse_caption(text)
        path = track(clip, parsed.objects[0][0] if parsed.objects else None)
        (x0, _, a0), (x1, _, a1) = path[0], path[-1]
        if math.isnan(x0) or math.isnan(x1):
            continue
        ratios.append(a1 / a0)
        dxs.append(x1 - x0)
    return {
        "clips": len(clips),
        "area_ratio": _mean(ratios),
        "dx": _mean(dxs),
        "tracked": _mean([1.0] * len(ratios) + [0.0] * (len(clips) - len(ratios))),
        "motion_alignment": _mean(motion_alignment(c, t) for c, t in zip(clips, captions)),
    }


def camera_effect(kind: str | None, on: Mapping, off: Mapping) -> bool | None:
    """Whether a MotionLoRA of ``kind`` does its motion: strength 1 (``on``) vs 0 (``off``)."""
    if kind == "zoom-in":
        if on["area_ratio"] is None:
            return False
        return on["area_ratio"] > 1 and on["area_ratio"] > (off["area_ratio"] or 0.0)
    if kind == "pan-left":
        if on["dx"] is None:
            return False
        along = on["dx"] * PAN_LEFT_DX
        return along > 0 and along > (off["dx"] or 0.0) * PAN_LEFT_DX
    return None
