"""Sampler presets for few-step motion modules, as their authors sample them.

- `lightning`, from the ByteDance/AnimateDiff-Lightning model card (diffusers usage):
  `EulerDiscreteScheduler.from_config(base_config, timestep_spacing="trailing",
  beta_schedule="linear")`, `num_inference_steps` = the checkpoint's step count (1, 2, 4 or 8;
  the card's example uses 4), `guidance_scale=1.0`.
- `animatelcm`, from the wangfuyun/AnimateLCM model card: `LCMScheduler.from_config(base_config,
  beta_schedule="linear")`, the AnimateLCM LoRA at 0.8 (`set_adapters(["lcm-lora"], [0.8])`),
  `num_inference_steps=6`, `guidance_scale=2.0`. (The AnimateLCM repository's own app uses
  `original_inference_steps=100`; pass `scheduler_config={"original_inference_steps": 100}`.)

The cards start from an SD1.5 scheduler config (`steps_offset=1`, `set_alpha_to_one=False`);
`make_scheduler` starts from AnimateDiff's schedule (`animatediff.schedule`), which with the
overrides below gives the same scheduler configuration.

At guidance_scale <= 1 the pipeline runs one UNet batch per step (no negative-prompt pass).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints.fewstep import Release, lora_release, motion_release
from ..checkpoints.io import read_metadata
from ..checkpoints.motion import DIFFUSERS_WEIGHTS, MotionCheckpoint
from ..options import OptionError

SETTINGS = ("scheduler", "scheduler_config", "num_inference_steps", "guidance_scale")
AUTO = "auto"


@dataclass(frozen=True)
class Preset:
    """How one family of few-step checkpoints is sampled."""

    name: str
    scheduler: str  # a `make_scheduler` name
    scheduler_config: Mapping[str, Any]  # overrides of AnimateDiff's schedule
    num_inference_steps: int  # used when the checkpoint does not say
    guidance_scale: float
    lora_strength: float | None = None  # the image LoRA that comes with it, if any
    source: str = ""

    def settings(self, steps: int | None = None) -> dict:
        out = {
            "scheduler": self.scheduler,
            "scheduler_config": dict(self.scheduler_config),
            "num_inference_steps": steps or self.num_inference_steps,
            "guidance_scale": self.guidance_scale,
        }
        if self.lora_strength is not None:
            out["lora_strength"] = self.lora_strength
        return out


PRESETS: dict[str, Preset] = {
    "lightning": Preset(
        "lightning",
        scheduler="euler",
        scheduler_config={"timestep_spacing": "trailing"},
        num_inference_steps=4,
        guidance_scale=1.0,
        source="ByteDance/AnimateDiff-Lightning model card",
    ),
    "animatelcm": Preset(
        "animatelcm",
        scheduler="lcm",
        scheduler_config={"set_alpha_to_one": False},
        num_inference_steps=6,
        guidance_scale=2.0,
        lora_strength=0.8,
        source="wangfuyun/AnimateLCM model card",
    ),
}
PRESET_CHOICES = (*PRESETS, AUTO)


def preset_settings(name: str, motion_module_info: object = None, **explicit: Any) -> dict:
    """The sampling settings of preset `name` ("lightning", "animatelcm" or "auto") for what was
    loaded, with every explicitly given (not None) setting winning.

    Returns `{"scheduler", "scheduler_config", "num_inference_steps", "guidance_scale"}`, plus
    `"lora_strength"` for presets that come with an image LoRA. `motion_module_info`: anything
    `detect_preset` takes; a Lightning file's step count sets `num_inference_steps`. "auto" with
    nothing recognised gives only the explicit settings (the pipeline's defaults apply). An
    explicit `scheduler` other than the preset's drops the preset's `scheduler_config`; an
    explicit `scheduler_config` is merged over it.
    """
    release = _first_release(motion_module_info)
    if name == AUTO:
        name = release.preset if release is not None else None
        if name is None:
            return _with_explicit({}, explicit)
    if name not in PRESETS:
        raise OptionError(f"unknown preset {name!r}; choose one of: {', '.join(PRESET_CHOICES)}")
    steps = release.steps if release is not None and release.preset == name else None
    return _with_explicit(PRESETS[name].settings(steps), explicit)


def detect_preset(*sources: object) -> str | None:
    """The preset the first recognised source calls for, or None. A source is a path (named as
    released, or a safetensors file this project wrote: recognised without loading it), a
    `MotionCheckpoint` (recognised by its keys too), a `Release`, or a dict with a "preset"
    key (`animatediff.checkpoints.detect.describe`'s, `Release.as_dict()`)."""
    release = _first_release(*sources)
    return release.preset if release is not None else None


def _with_explicit(settings: dict, explicit: Mapping[str, Any]) -> dict:
    unknown = sorted(set(explicit) - {*SETTINGS, "lora_strength"})
    if unknown:
        raise OptionError(f"not a preset setting: {', '.join(unknown)}; expected {SETTINGS}")
    given = {k: v for k, v in explicit.items() if v is not None}
    if "scheduler" in given and given["scheduler"] != settings.get("scheduler"):
        settings = {**settings, "scheduler_config": {}}  # made for the preset's scheduler
    config = {**settings.get("scheduler_config", {}), **given.pop("scheduler_config", {})}
    out = {**settings, **given}
    if config or "scheduler_config" in settings:
        out["scheduler_config"] = config
    return out


def _first_release(*sources: object) -> Release | None:
    for source in sources:
        release = _release(source)
        if release is not None and release.preset is not None:
            return release
    return None


def _release(source: object) -> Release | None:
    if source is None or isinstance(source, Release):
        return source
    if isinstance(source, MotionCheckpoint):
        return source.release
    if isinstance(source, Mapping):
        if isinstance(source.get("release"), Release):
            return source["release"]
        preset = source.get("preset")
        name = source.get("release") or source.get("name") or preset
        return Release(str(name), preset, source.get("steps"), "given") if preset else None
    if isinstance(source, (str, Path)):
        return _file_release(Path(source))
    raise TypeError(f"cannot tell a preset from a {type(source).__name__}")


def _file_release(path: Path) -> Release | None:
    """By name and safetensors metadata alone (no weights read)."""
    weights = next((path / n for n in DIFFUSERS_WEIGHTS if (path / n).is_file()), path)
    metadata = read_metadata(weights) if weights.is_file() else {}
    if "lora" in path.name.lower():
        return lora_release(path, metadata)
    return motion_release(path, metadata)
