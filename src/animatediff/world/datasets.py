"""Write the miniature world to folders in the layout the trainer reads.

Images are ``NAME.png`` and videos ``NAME.mp4`` (H.264), each beside a ``NAME.txt`` caption
(see ``animatediff.training.data.folder_clips``). Item ``i`` is drawn from the seed ``(seed,
i)``, so a dataset's first items do not depend on how many are written.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..video import save_video
from .domain import web_video
from .motion import CAMERA_KINDS, KINDS, OBJECT_KINDS, make_clip
from .scene import DIRECTIONS, SPEEDS, Scene, as_rng, caption, pick, random_scene, render
from .styles import style_images

FPS = 8


def first_frame_caption(scene: Scene, rng: np.random.Generator) -> str:
    """The caption of a clip of any kind (camera motions too) that starts at ``scene``: a
    still is the first frame of such a clip, so the caption stays true, and a text encoder
    trained on stills meets every word of the grammar, where it will find it at sampling."""
    kind = pick(rng, KINDS)
    words = {}
    if kind == "move":
        words = {"direction": pick(rng, DIRECTIONS), "speed": pick(rng, SPEEDS)}
    return caption(scene, kind, **words)


def write_images(
    folder: str | os.PathLike,
    n: int,
    seed: int,
    style: str | None = None,
    size: int = 64,
    motion_captions: float = 0.0,
) -> list[Path]:
    """``n`` stills (plain, or of a personal ``style``) as ``image_00000.png`` + ``.txt``; a
    share ``motion_captions`` of the plain ones is captioned as a clip's first frame
    (``first_frame_caption``), drawn from the seed ``(seed, i, 1)``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if style is None:
        items = []
        for i in range(n):
            scene = random_scene(as_rng([seed, i]))
            rng = as_rng([seed, i, 1])
            text = caption(scene)
            if rng.random() < motion_captions:
                text = first_frame_caption(scene, rng)
            items.append((render(scene, size), text))
    else:
        items = style_images(style, n, seed, size)
    paths = []
    for i, (image, text) in enumerate(items):
        path = folder / f"image_{i:05d}.png"
        Image.fromarray(image).save(path)
        path.with_suffix(".txt").write_text(text + "\n")
        paths.append(path)
    return paths


def write_videos(
    folder: str | os.PathLike,
    n: int,
    seed: int,
    kinds: tuple[str, ...] | list[str] | None = None,
    web: bool = True,
    num_frames: int = 16,
    size: int = 64,
) -> list[Path]:
    """``n`` clips as ``clip_00000.mp4`` + ``.txt``, cycling through ``kinds`` (default the
    object motions, no camera motion); ``web`` gives them the blur and watermark of web video."""
    folder = Path(folder)
    kinds = tuple(kinds or OBJECT_KINDS)
    paths = []
    for i in range(n):
        frames, text, _ = make_clip(as_rng([seed, i]), num_frames, size, kinds[i % len(kinds)])
        if web:
            frames = web_video(frames)
        path = folder / f"clip_{i:05d}.mp4"
        video = torch.from_numpy(frames).permute(3, 0, 1, 2).float() / 255  # (3, f, h, w)
        save_video(video, path, fps=FPS, overwrite=True)
        path.with_suffix(".txt").write_text(text + "\n")
        paths.append(path)
    return paths


def motion_clips(
    kind: str, n: int, seed: int, num_frames: int = 16, size: int = 64
) -> list[tuple[np.ndarray, str, dict]]:
    """``n`` clean clips of one camera motion, the training set of a MotionLoRA."""
    if kind not in CAMERA_KINDS:
        raise ValueError(f"MotionLoRA clips are one of {CAMERA_KINDS}, not {kind!r}")
    return [make_clip(as_rng([seed, i]), num_frames, size, kind) for i in range(n)]
