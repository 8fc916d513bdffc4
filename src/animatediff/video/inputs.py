"""Images and videos given to a generation (control images, init image, input video) as one
tensor layout: (b, 3, f, H, W) float in [0, 1], resized and centre-cropped to the output size."""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from PIL import Image

from ..options import VIDEO_SUFFIXES, OptionError
from .read import read_frames_as_tensor, read_video, resize_center_crop
from .write import Video

FramesLike = torch.Tensor | Image.Image | Sequence[Image.Image] | Video | str | os.PathLike


def as_frames(frames: FramesLike, height: int, width: int, what: str) -> torch.Tensor:
    """A tensor (b, 3, f, H, W) or (3, f, H, W) in [0, 1], PIL image(s), a `Video`, or a path
    (video file, image file or folder of frames) -> (b, 3, f, height, width) float32."""
    if isinstance(frames, (str, os.PathLike)):
        video = read_video(frames).unsqueeze(0)
    elif isinstance(frames, Video):
        video = frames.frames
    elif isinstance(frames, Image.Image):
        video = read_frames_as_tensor([frames]).unsqueeze(0)
    elif isinstance(frames, torch.Tensor):
        video = frames if frames.ndim == 5 else frames.unsqueeze(0)
    elif all(isinstance(f, Image.Image) for f in frames):
        video = read_frames_as_tensor(list(frames)).unsqueeze(0)
    else:  # a list of files (or tensors): each resized, then placed one after the other
        return torch.cat([as_frames(f, height, width, what) for f in frames], dim=2)
    if video.ndim != 5 or video.shape[1] != 3:
        raise OptionError(f"{what}: expected (b, 3, f, h, w) frames, got {tuple(video.shape)}")
    video = video.float()
    if video.min() < 0 or video.max() > 1:
        raise OptionError(f"{what}: values must be in [0, 1], got [{video.min()}, {video.max()}]")
    if tuple(video.shape[-2:]) != (height, width):
        video = torch.stack([resize_center_crop(v, (width, height)) for v in video])
    return video


def as_image(image: FramesLike, height: int, width: int, what: str) -> torch.Tensor:
    """Like :func:`as_frames` for one image per video: tensors are (3, H, W) or (b, 3, H, W)."""
    if isinstance(image, torch.Tensor) and image.ndim in (3, 4):
        image = (image if image.ndim == 4 else image.unsqueeze(0)).unsqueeze(2)
    return as_frames(image, height, width, what)


def reference_images(images) -> Image.Image | list[Image.Image] | torch.Tensor:
    """Reference images as given, with paths read: an image file -> a PIL image, a video or a
    folder of frames -> (1, 3, f, H, W) in [0, 1], a list of image files -> PIL images (their
    own sizes: the reader of the images decides how to resize them)."""
    if isinstance(images, (str, os.PathLike)):
        path = os.fspath(images)
        if os.path.isfile(path) and not path.lower().endswith(VIDEO_SUFFIXES):
            return Image.open(path).convert("RGB")
        return read_video(path).unsqueeze(0)
    if isinstance(images, Sequence) and not isinstance(images, torch.Tensor):
        items = [reference_images(i) for i in images]
        if not all(isinstance(i, Image.Image) for i in items):
            raise OptionError("give reference images as image files, or one video")
        return items if len(items) > 1 else items[0]
    return images
