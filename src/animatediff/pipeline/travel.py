"""Prompt travel: a prompt per keyframe, text embeddings interpolated between keyframes.

A prompt map `{frame: prompt}` (YAML/JSON keys may be digit strings; -1 is the last frame) is
parsed by :func:`parse_prompt_map`; each prompt is encoded once and :func:`frame_embeddings`
turns the keyframe embeddings into one embedding per frame, which MotionUNet takes as per-frame
text (b*f, 77, d).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F

from ..options import OptionError

__all__ = [
    "METHODS",
    "compose_prompt",
    "frame_embeddings",
    "parse_prompt_map",
    "slerp",
    "travel_prompts",
]

METHODS = ("linear", "slerp")
_INDEX = re.compile(r"-?\d+")


def _frame_index(key: int | str, num_frames: int) -> int:
    """A prompt-map key as a frame in [0, num_frames); -1 is the last frame."""
    if isinstance(key, str):
        if not _INDEX.fullmatch(key.strip()):
            raise OptionError(f"prompt_map key {key!r} is not a frame index")
        index = int(key)
    elif isinstance(key, bool):  # an int subclass, never meant as a frame
        raise OptionError(f"prompt_map key {key!r} is not a frame index")
    else:
        try:
            index = operator.index(key)  # accepts numpy ints too
        except TypeError:
            raise OptionError(f"prompt_map key {key!r} is not a frame index") from None
    if index == -1:
        return num_frames - 1
    if not 0 <= index < num_frames:
        raise OptionError(
            f"prompt_map key {key!r} is outside frames 0..{num_frames - 1} (-1: the last frame)"
        )
    return index


def parse_prompt_map(prompt_map: Mapping[int | str, str], num_frames: int) -> list[tuple[int, str]]:
    """`{frame: prompt}` -> `[(frame, prompt), ...]` sorted by frame.

    Keys are ints or digit strings; -1 (or "-1") is frame num_frames - 1. Errors: an empty map,
    a key that is not an index, out of range, or naming a frame another key already names
    (e.g. 15 and -1 with 16 frames), a prompt that is not a string.
    """
    if num_frames < 1:
        raise OptionError(f"num_frames must be >= 1, got {num_frames}")
    if not prompt_map:
        raise OptionError("prompt_map is empty: give at least one {frame: prompt}")
    keys: dict[int, int | str] = {}
    prompts: list[tuple[int, str]] = []
    for key, text in prompt_map.items():
        frame = _frame_index(key, num_frames)
        if frame in keys:
            raise OptionError(
                f"prompt_map keys {keys[frame]!r} and {key!r} both name frame {frame}"
            )
        if not isinstance(text, str):
            raise OptionError(
                f"prompt for frame {key!r} must be a string, got {type(text).__name__}"
            )
        keys[frame] = key
        prompts.append((frame, text))
    return sorted(prompts, key=lambda item: item[0])


def compose_prompt(head: str, text: str, tail: str) -> str:
    """`head, text, tail` joined with ", ", skipping empty parts (stray edge commas dropped)."""
    parts = (part.strip().strip(",").strip() for part in (head, text, tail))
    return ", ".join(part for part in parts if part)


def travel_prompts(
    prompt_map: Mapping[int | str, str], num_frames: int, head: str = "", tail: str = ""
) -> list[tuple[int, str]]:
    """:func:`parse_prompt_map` with every prompt wrapped by :func:`compose_prompt`."""
    return [
        (frame, compose_prompt(head, text, tail))
        for frame, text in parse_prompt_map(prompt_map, num_frames)
    ]


def slerp(
    a: torch.Tensor, b: torch.Tensor, t: torch.Tensor | float, parallel: float = 0.9995
) -> torch.Tensor:
    """Spherical interpolation of the vectors along the last dim of `a` and `b` at `t`
    (broadcast), in float32: sin((1-t)w)/sin(w) a + sin(t w)/sin(w) b, w the angle between
    them. Where |cos w| > `parallel` the sines vanish, so it falls back to lerp."""
    a, b = a.float(), b.float()
    t = torch.as_tensor(t, dtype=torch.float32, device=a.device)
    cos = (F.normalize(a, dim=-1) * F.normalize(b, dim=-1)).sum(-1, keepdim=True).clamp(-1, 1)
    omega = torch.acos(cos)
    near = cos.abs() > parallel
    sin = torch.where(near, torch.ones_like(omega), torch.sin(omega))
    wa = torch.where(near, 1 - t, torch.sin((1 - t) * omega) / sin)
    wb = torch.where(near, t, torch.sin(t * omega) / sin)
    return wa * a + wb * b


def _segments(
    frames: list[int], num_frames: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per frame: index of the keyframe before it, of the one after, and the fraction t in
    [0, 1] between them; frames outside the keyframes hold the nearest one (t = 0)."""
    keys = torch.tensor(frames, dtype=torch.float64)
    pos = torch.arange(num_frames, dtype=torch.float64)
    left = (torch.searchsorted(keys, pos, right=True) - 1).clamp(0, len(frames) - 1)
    right = (left + 1).clamp(max=len(frames) - 1)
    gap = keys[right] - keys[left]
    t = torch.where(gap > 0, (pos - keys[left]) / gap.clamp(min=1), torch.zeros_like(pos))
    return left, right, t.clamp(0, 1)


def frame_embeddings(
    keyframes: list[tuple[int, torch.Tensor]], num_frames: int, method: str = "linear"
) -> torch.Tensor:
    """Keyframe text embeddings -> one per frame, (num_frames, *shape) (shape: (77, d)).

    At a keyframe: exactly its embedding. Between keys fa < fb, at t = (i - fa) / (fb - fa):
    `linear` (1 - t) e_a + t e_b, or `slerp` per token vector (:func:`slerp`). Before the first
    key its embedding is held, after the last key the last one's (no wrap-around).
    """
    if method not in METHODS:
        raise OptionError(f"unknown interpolation {method!r}; one of {METHODS}")
    if num_frames < 1:
        raise OptionError(f"num_frames must be >= 1, got {num_frames}")
    if not keyframes:
        raise OptionError("no keyframes")
    keys = sorted(keyframes, key=lambda item: item[0])
    frames = [frame for frame, _ in keys]
    if len(set(frames)) != len(frames):
        raise OptionError(f"duplicate keyframes in {frames}")
    if frames[0] < 0 or frames[-1] >= num_frames:
        raise OptionError(f"keyframes {frames} must lie in 0..{num_frames - 1}")
    shapes = {tuple(emb.shape) for _, emb in keys}
    if len(shapes) != 1:
        raise OptionError(f"keyframe embeddings differ in shape: {sorted(shapes)}")
    stack = torch.stack([emb for _, emb in keys])
    left, right, t = _segments(frames, num_frames)
    left, right = left.to(stack.device), right.to(stack.device)
    t = t.to(stack.device, torch.float32).view(-1, *[1] * (stack.ndim - 1))
    a, b = stack[left].float(), stack[right].float()
    out = torch.lerp(a, b, t) if method == "linear" else slerp(a, b, t)
    out = out.to(stack.dtype)
    out[torch.tensor(frames, device=stack.device)] = stack  # exact at the keys
    return out
