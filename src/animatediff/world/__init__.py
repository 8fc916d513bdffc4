"""A procedural miniature world of captioned images and videos, and detectors for it: the
data for training and evaluating a tiny AnimateDiff. Everything is deterministic from a seed.

- ``scene``: shapes on textured backgrounds, anti-aliased rendering, the caption grammar
- ``motion``: clips of object motion (move, grow, shrink, turn) and camera motion (zoom, pan)
- ``domain``: the web-video look (blur, watermark) of training videos
- ``styles``: personal styles (stripes, outline) the base model never sees
- ``detect``: segmentation, shape, tracking, watermark, style and caption checks

Beside them (they import torch, so the package does not import them): ``datasets`` writes
folders of PNG/MP4 + caption files for the trainer, ``build`` trains the built-in models, ``pack``
ships them, ``evaluate`` measures the paper's claims (``evaluate_settings``: its prompts and
options, ``metrics``: its clip metrics, ``report``: its tables; these three are torch-free),
``compare`` a distilled student against its teacher, ``direction`` whether a module knows which
way a motion goes and how much it draws on the other frames, ``probe`` what a text encoder
tells apart.
"""

from .detect import (
    alignment_checks,
    classify_shape,
    classify_style,
    dominant_object,
    dynamic_degree,
    has_watermark,
    is_dynamic,
    motion_alignment,
    motion_smoothness,
    segment,
    style_score,
    style_scores,
    temporal_consistency,
    text_alignment,
    track,
    watermark_score,
)
from .domain import blur, watermark, web_video
from .motion import CAMERA_KINDS, KINDS, OBJECT_KINDS, PAN_LEFT_DX, make_clip
from .scene import VOCABULARY, Camera, Scene, Sprite, caption, parse_caption, random_scene, render
from .styles import STYLES, render_styled, style_images

__all__ = [
    "CAMERA_KINDS",
    "KINDS",
    "OBJECT_KINDS",
    "PAN_LEFT_DX",
    "STYLES",
    "VOCABULARY",
    "Camera",
    "Scene",
    "Sprite",
    "alignment_checks",
    "blur",
    "caption",
    "classify_shape",
    "classify_style",
    "dominant_object",
    "dynamic_degree",
    "has_watermark",
    "is_dynamic",
    "make_clip",
    "motion_alignment",
    "motion_smoothness",
    "parse_caption",
    "random_scene",
    "render",
    "render_styled",
    "segment",
    "style_images",
    "style_score",
    "style_scores",
    "temporal_consistency",
    "text_alignment",
    "track",
    "watermark",
    "watermark_score",
    "web_video",
]
