"""One generation's settings, and the one place that turns them into the pipeline's keyword
arguments, an `animatediff generate` command line and a prompt-config YAML.

The three must describe the same animation: the tests run the command and the config through
the CLI and compare the frames with the page's result. When the CLI's flags or config keys
change, this file is what follows them.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass
from pathlib import Path

import yaml

from ..builtin.model import builtin_model
from .library import ModelEntry

Weighted = tuple[ModelEntry, float]

# The CLI's defaults: flags left at them are not written into the command.
DEFAULTS = dict(
    scheduler="ddim",
    fps=8.0,
    context_length=16,
    context_overlap=4,
    context_stride=1,
    context_schedule="static",
    context_fuse="pyramid",
    prompt_interpolation="linear",
    motion_scale=1.0,
)


@dataclass(frozen=True)
class ControlNetUnit:
    """A standard ControlNet with its control video/frames (a stored upload)."""

    model: ModelEntry
    images: str
    scale: float = 1.0
    start: float = 0.0
    end: float = 1.0


@dataclass(frozen=True)
class ModelSpec:
    """The files a pipeline is built from (hashable: the model manager compares them)."""

    base: str | None
    personal: str | None
    vae: str | None
    loras: tuple[tuple[str, float], ...]
    adapter: tuple[str, float] | None
    motion_module: str | None
    motion_loras: tuple[tuple[str, float], ...]
    sparsectrl: str | None
    controlnets: tuple[str, ...]


@dataclass(frozen=True)
class Settings:
    """Everything that decides one animation. Paths of uploads and of the prompt map are files
    already stored in the result's folder; the seed is the one used (never random here)."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    prompt_map: str | None = None  # a stored JSON {frame: prompt}; `prompt` is then its head
    prompt_tail: str = ""
    prompt_interpolation: str = "linear"
    base: ModelEntry | None = None  # None: the built-in model
    personal: ModelEntry | None = None
    vae: ModelEntry | None = None
    loras: tuple[Weighted, ...] = ()
    motion_module: ModelEntry | None = None  # None: the built-in one
    motion_loras: tuple[Weighted, ...] = ()
    adapter: Weighted | None = None
    num_frames: int = 16
    width: int = 64
    height: int = 64
    steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    preset: str | None = None  # a few-step sampler preset (its scheduler settings apply)
    fps: float = 8.0
    context_length: int = 16  # 0: every frame at once
    context_overlap: int = 4
    context_stride: int = 1
    context_schedule: str = "static"
    context_fuse: str = "pyramid"
    context_views: bool = False
    freenoise: bool = False
    freeinit_iterations: int = 0
    motion_scale: float = 1.0
    sparsectrl: ModelEntry | None = None
    control_images: tuple[str, ...] = ()
    control_frames: tuple[int, ...] = ()
    control_scale: float = 1.0
    controlnets: tuple[ControlNetUnit, ...] = ()
    init_image: str | None = None
    init_video: str | None = None
    strength: float = 0.8
    dtype: str | None = None  # the server's --dtype, when it was given one

    # -- what is loaded ----------------------------------------------------------------------
    def image_loras(self) -> list[tuple[str, float]]:
        """Image LoRAs in merge order; a built-in LoRA style comes last at 1.0, as the CLI's
        `--personal NAME` puts it."""
        loras = [(str(e.path), s) for e, s in self.loras]
        if self.personal is not None and self.personal.kind == "lora":
            loras.append((str(self.personal.path), 1.0))
        return loras

    def personal_checkpoint(self) -> str | None:
        if self.personal is None or self.personal.kind == "lora":
            return None
        return str(self.personal.path)

    def motion_module_path(self) -> str | None:
        """None (the built-in one) only with the built-in base, as `AnimationPipeline.load`."""
        if self.motion_module is None:
            return None if self.base is None else str(_builtin_module())
        if self.base is None and self.motion_module.builtin == "motion_module":
            return None
        return str(self.motion_module.path)

    def model_spec(self) -> ModelSpec:
        return ModelSpec(
            base=None if self.base is None or self.base.builtin else str(self.base.path),
            personal=self.personal_checkpoint(),
            vae=_path(self.vae),
            loras=tuple(self.image_loras()),
            adapter=None if self.adapter is None else (str(self.adapter[0].path), self.adapter[1]),
            motion_module=self.motion_module_path(),
            motion_loras=tuple((str(e.path), s) for e, s in self.motion_loras),
            sparsectrl=_path(self.sparsectrl),
            controlnets=tuple(str(u.model.path) for u in self.controlnets),
        )

    # -- the pipeline call -------------------------------------------------------------------
    def prompt_argument(self) -> str | dict:
        if self.prompt_map is None:
            return self.prompt
        return json.loads(Path(self.prompt_map).read_text())  # as the CLI reads the file

    def pipeline_kwargs(self) -> dict:
        """`AnimationPipeline.__call__` keyword arguments, as `animatediff generate` passes them."""
        kwargs = dict(
            prompt=self.prompt_argument(),
            negative_prompt=self.negative_prompt,
            num_frames=self.num_frames,
            height=self.height,
            width=self.width,
            num_inference_steps=self.steps,
            guidance_scale=self.guidance_scale,
            seed=self.seed,
            scheduler=self.scheduler,
            preset=self.preset,
            fps=self.fps,
            context_length=self.context_length or None,
            context_overlap=self.context_overlap,
            context_stride=self.context_stride,
            context_schedule=self.context_schedule,
            context_fuse=self.context_fuse,
            context_views=self.context_views,
            prompt_head=self.prompt if self.prompt_map else "",
            prompt_tail=self.prompt_tail if self.prompt_map else "",
            prompt_interpolation=self.prompt_interpolation,
            freenoise=self.freenoise,
            freeinit_iterations=self.freeinit_iterations,
            motion_scale=self.motion_scale,
        )
        return {**kwargs, **self._input_kwargs()}

    def _input_kwargs(self) -> dict:
        kwargs: dict = {}
        if self.control_images:
            images = list(self.control_images)
            kwargs.update(
                control_images=images[0] if len(images) == 1 else images,
                control_frames=list(self.control_frames) or None,
                control_scale=self.control_scale,
            )
        if self.controlnets:
            kwargs.update(
                controlnet_images=[u.images for u in self.controlnets],
                controlnet_scale=[u.scale for u in self.controlnets],
                controlnet_start=[u.start for u in self.controlnets],
                controlnet_end=[u.end for u in self.controlnets],
            )
        for key in ("init_image", "init_video"):
            if getattr(self, key):
                kwargs.update({key: getattr(self, key), "strength": self.strength})
        return kwargs


def _path(entry: ModelEntry | None) -> str | None:
    return None if entry is None else str(entry.path)


def _builtin_module() -> Path:
    return builtin_model().motion_module


def _number(x: float) -> str:
    """Exact and short: repr round-trips a float; whole numbers lose nothing as ints."""
    return str(int(x)) if float(x).is_integer() and abs(x) < 1e15 else repr(float(x))


def _weighted(name: str, strength: float) -> str:
    return f"{name}:{_number(strength)}"


def _name(entry: ModelEntry) -> str:
    """What the CLI accepts for a personal style or MotionLoRA: a built-in name or a path."""
    return entry.builtin if entry.builtin else str(entry.path)


# -- the command line ------------------------------------------------------------------------
def command_argv(s: Settings) -> list[str]:
    """`animatediff generate ...` reproducing `s` (built-in names where the CLI takes them)."""
    argv = ["animatediff", "generate"]
    prompt_positional = s.prompt_map is None and not s.prompt.startswith("-")
    if prompt_positional:
        argv.append(s.prompt)
    argv += _model_flags(s) + _sampling_flags(s) + _input_flags(s)
    if s.prompt_map is None and not prompt_positional:
        argv += ["--", s.prompt]  # a prompt that looks like a flag
    return argv


def command(s: Settings) -> str:
    return shlex.join(command_argv(s))


def _model_flags(s: Settings) -> list[str]:
    flags: list[str] = []
    if s.base is not None and not s.base.builtin:
        flags += ["--base", str(s.base.path)]
    if s.motion_module_path() is not None:
        student = s.motion_module.builtin not in (None, "motion_module")  # a built-in name
        flags += ["--motion-module", _name(s.motion_module) if student else s.motion_module_path()]
    if s.personal is not None:
        flags += ["--personal", _name(s.personal)]
    if s.vae is not None:
        flags += ["--vae", str(s.vae.path)]
    for entry, strength in s.loras:
        flags += ["--lora", _weighted(str(entry.path), strength)]
    for entry, strength in s.motion_loras:
        flags += ["--motion-lora", _weighted(_name(entry), strength)]
    if s.adapter is not None:
        flags += ["--adapter", _weighted(str(s.adapter[0].path), s.adapter[1])]
    if s.dtype:
        flags += ["--dtype", s.dtype]
    return flags


def _sampling_flags(s: Settings) -> list[str]:
    flags = [
        *("--frames", str(s.num_frames), "--width", str(s.width), "--height", str(s.height)),
        *("--steps", str(s.steps), "--guidance-scale", _number(s.guidance_scale)),
        *("--seed", str(s.seed)),
    ]
    if s.negative_prompt:
        flags = ["--negative-prompt", s.negative_prompt, *flags]
    for name, flag in (
        ("scheduler", "--scheduler"),
        ("fps", "--fps"),
        ("context_length", "--context-length"),
        ("context_overlap", "--context-overlap"),
        ("context_stride", "--context-stride"),
        ("context_schedule", "--context-schedule"),
        ("context_fuse", "--context-fuse"),
        ("motion_scale", "--motion-scale"),
    ):
        value = getattr(s, name)
        if value != DEFAULTS[name]:
            flags += [flag, value if isinstance(value, str) else _number(value)]
    flags += ["--preset", s.preset] if s.preset else []
    flags += ["--context-views"] if s.context_views else []
    flags += ["--freenoise"] if s.freenoise else []
    flags += ["--freeinit", str(s.freeinit_iterations)] if s.freeinit_iterations else []
    if s.prompt_map is not None:
        flags += ["--prompt-map", s.prompt_map]
        flags += ["--prompt-head", s.prompt] if s.prompt else []
        flags += ["--prompt-tail", s.prompt_tail] if s.prompt_tail else []
        if s.prompt_interpolation != DEFAULTS["prompt_interpolation"]:
            flags += ["--prompt-interpolation", s.prompt_interpolation]
    return flags


def _input_flags(s: Settings) -> list[str]:
    flags: list[str] = []
    if s.sparsectrl is not None:
        flags += ["--sparsectrl", str(s.sparsectrl.path)]
    if s.control_images:
        flags += ["--control-images", *s.control_images]
        if s.control_frames:
            flags += ["--control-frames", *map(str, s.control_frames)]
        flags += ["--control-scale", _number(s.control_scale)]
    for unit in s.controlnets:
        flags += ["--controlnet", _weighted(str(unit.model.path), unit.scale)]
        flags += ["--controlnet-images", unit.images]
    for unit in s.controlnets:  # given once per --controlnet, in the same order
        flags += ["--controlnet-start", _number(unit.start)]
    for unit in s.controlnets:
        flags += ["--controlnet-end", _number(unit.end)]
    for key, flag in (("init_image", "--init-image"), ("init_video", "--init-video")):
        if getattr(s, key):
            flags += [flag, getattr(s, key), "--strength", _number(s.strength)]
    return flags


# -- the prompt config -----------------------------------------------------------------------
class NotExpressible(ValueError):
    """Settings a prompt config cannot hold (use the command instead)."""


def config_flags(s: Settings) -> list[str]:
    """Flags that a config run needs beside `--config`: what configs have no key for."""
    flags = []
    if s.base is not None and not s.base.builtin:
        flags += ["--base", str(s.base.path)]
    if s.vae is not None:
        flags += ["--vae", str(s.vae.path)]
    if s.scheduler != DEFAULTS["scheduler"]:
        flags += ["--scheduler", s.scheduler]
    if s.fps != DEFAULTS["fps"]:
        flags += ["--fps", _number(s.fps)]
    return flags + (["--dtype", s.dtype] if s.dtype else [])


def config_entry(s: Settings) -> dict:
    """One entry of an `animatediff generate --config` YAML (the official keys where they
    exist, this project's otherwise)."""
    loras = s.image_loras()
    if len(loras) > 1:
        raise NotExpressible(
            "a prompt config holds one image LoRA (lora_model_path); use 'copy as command'"
        )
    entry: dict = {"motion_module": s.motion_module_path() or str(_builtin_module())}
    if s.prompt_map is None:
        entry["prompt"] = [s.prompt]
    else:
        entry["prompt_map"] = s.prompt_argument()
        entry.update(prompt_head=s.prompt, prompt_tail=s.prompt_tail)
        entry["prompt_interpolation"] = s.prompt_interpolation
    entry["n_prompt"] = [s.negative_prompt]
    if s.personal_checkpoint():
        entry["dreambooth_path"] = s.personal_checkpoint()
    if loras:
        entry.update(lora_model_path=loras[0][0], lora_alpha=loras[0][1])
    if s.motion_loras:
        entry["motion_module_lora_configs"] = [
            {"path": str(e.path), "alpha": w} for e, w in s.motion_loras
        ]
    if s.adapter is not None:
        entry.update(adapter_lora_path=str(s.adapter[0].path), adapter_lora_scale=s.adapter[1])
    if s.preset:
        entry["preset"] = s.preset
    entry.update(
        seed=[s.seed],
        steps=s.steps,
        guidance_scale=s.guidance_scale,
        W=s.width,
        H=s.height,
        L=s.num_frames,
    )
    return {**entry, **_config_sampling(s), **_config_inputs(s)}


def _config_sampling(s: Settings) -> dict:
    return dict(
        context_length=s.context_length or None,
        context_overlap=s.context_overlap,
        context_stride=s.context_stride,
        context_schedule=s.context_schedule,
        context_fuse=s.context_fuse,
        context_views=s.context_views,
        freenoise=s.freenoise,
        freeinit_iterations=s.freeinit_iterations,
        motion_scale=s.motion_scale,
    )


def _config_inputs(s: Settings) -> dict:
    entry: dict = {}
    if s.sparsectrl is not None:
        entry["sparsectrl"] = str(s.sparsectrl.path)
    if s.control_images:
        images = list(s.control_images)
        entry["control_images"] = images[0] if len(images) == 1 else images
        if s.control_frames:
            entry["control_frames"] = list(s.control_frames)
        entry["control_scale"] = s.control_scale
    if s.controlnets:
        entry["controlnets"] = [
            dict(path=str(u.model.path), images=u.images, scale=u.scale, start=u.start, end=u.end)
            for u in s.controlnets
        ]
    for key in ("init_image", "init_video"):
        if getattr(s, key):
            entry.update({key: getattr(s, key), "strength": s.strength})
    return entry


def config_yaml(s: Settings, name: str = "animation.yaml") -> str:
    """The YAML text, headed by the command that runs it."""
    run = shlex.join(["animatediff", "generate", "--config", name, *config_flags(s)])
    body = yaml.safe_dump([config_entry(s)], sort_keys=False, allow_unicode=True)
    return f"# {run}\n{body}"
