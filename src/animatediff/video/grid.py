"""Several videos tiled into one, as the official script's `save_videos_grid` does for a prompt
config's `sample.gif` (torchvision's `make_grid` per frame: `columns` videos per row, 2 black
pixels between and around them; a single video is returned unpadded, as `make_grid` does)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def video_grid(videos: Sequence[torch.Tensor], columns: int = 4, padding: int = 2) -> torch.Tensor:
    """(3, f, h, w) videos -> one (3, F, H, W) video. Videos of different sizes sit top-left
    in cells of the largest size; shorter ones hold their last frame."""
    if not videos:
        raise ValueError("no videos to tile")
    if len(videos) == 1:
        return videos[0]
    frames = max(v.shape[1] for v in videos)
    height = max(v.shape[2] for v in videos) + padding
    width = max(v.shape[3] for v in videos) + padding
    cols = min(columns, len(videos))
    rows = math.ceil(len(videos) / cols)
    out = torch.zeros(3, frames, rows * height + padding, cols * width + padding)
    for i, video in enumerate(videos):
        if video.shape[1] < frames:  # hold the last frame
            tail = video[:, -1:].expand(-1, frames - video.shape[1], -1, -1)
            video = torch.cat([video, tail], dim=1)
        y = (i // cols) * height + padding
        x = (i % cols) * width + padding
        out[:, :, y : y + video.shape[2], x : x + video.shape[3]] = video
    return out
