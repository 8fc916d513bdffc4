"""Generation options: one frozen dataclass per concern, each option spelled once.

A field's name is its keyword argument of `AnimationPipeline.__call__`, its key in configs and
in the settings JSON written beside every output; its metadata gives its command-line flag,
help, choices and limits, from which the CLI builds its flags (`cli/flags.py`). Values are
checked here, torch-free, so a mistake is reported before any model loads. :class:`Options`
groups them; `Options.build(flat_keywords)` routes flat keywords to their group.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UserError

# Names only (the classes live in pipeline/schedulers.py, which imports diffusers).
SCHEDULER_NAMES = ("ddim", "euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "lcm")
CONTEXT_SCHEDULES = ("static", "uniform", "looped", "batched")
FUSE_KINDS = ("flat", "pyramid", "overlap-linear")
FREEINIT_FILTERS = ("butterworth", "gaussian", "ideal", "box")
INTERPOLATIONS = ("linear", "slerp")
PRESET_NAMES = ("lightning", "animatelcm", "auto")  # pipeline/presets.py defines them
OFFLOAD_MODES = ("none", "model", "sequential")  # pipeline/offload.py
COMPILE_MODES = ("none", "regional", "full")  # pipeline/speed.py
TILING = ("auto", "on", "off")  # vae.py
OUTPUT_SUFFIXES = (".gif", ".mp4", ".webp")  # and a folder name (no suffix) for PNG frames
# Inputs read as videos (anything else is an image, or a folder of frames).
VIDEO_SUFFIXES = (".mp4", ".gif", ".webp", ".mov", ".avi", ".mkv", ".webm")
# Stated limits: beyond them a run cannot fit any machine this project targets.
MAX_SIZE = 4096  # pixels per side
MAX_FRAMES = 4096
MAX_STEPS = 500  # DDIM with steps_offset=1 cannot take 1000 steps; more never help
MAX_STRENGTH = 10.0  # LoRA / MotionLoRA / adapter strengths (A1111 allows negative ones)
MAX_VIDEOS = 64
DEVICE = re.compile(r"auto|cpu|mps|(cuda|xpu)(:\d+)?")


class OptionError(UserError):
    """An option with a wrong type or value; the message names the option (`name`), which the
    CLI replaces with the flag the user typed."""

    def __init__(self, message: str, name: str | None = None, detail: str | None = None):
        super().__init__(message)
        self.name, self.detail = name, detail

    def renamed(self, name: str) -> OptionError:
        """The same error naming the option `name` (e.g. its command-line flag)."""
        if self.name is None:
            return self
        return OptionError(f"{name}{self.detail}", name, self.detail)


def opt(default: Any, help: str, **meta: Any) -> Any:
    """A field with CLI metadata: `flag`, `choices`, `minimum`, `maximum`, `multiple` (of),
    `nargs`, `action`, `kind` (the value type the CLI parses), `cli=False` (no flag),
    `nullable` (None is a value, though the default is not)."""
    return field(default=default, metadata={"help": help, **meta})


def _bad(name: str, value: Any, why: str) -> OptionError:
    shown = value if isinstance(value, int | float) and not isinstance(value, bool) else repr(value)
    detail = f" {shown}: {why}"
    return OptionError(f"{name}{detail}", name, detail)


def _number(name: str, value: Any, kind: type) -> int | float:
    """An int or float from a number or a numeric string (YAML reads `1e-3` as a string)."""
    if isinstance(value, bool):
        raise _bad(name, value, f"expected {'an integer' if kind is int else 'a number'}")
    if isinstance(value, str):
        try:
            value = float(value.strip()) if kind is float else int(value.strip())
        except ValueError:
            what = "an integer" if kind is int else "a number"
            raise _bad(name, value, f"expected {what}") from None
    if kind is int and isinstance(value, float) and value.is_integer():
        value = int(value)
    if kind is int and not isinstance(value, int):
        raise _bad(name, value, "expected an integer")
    if not isinstance(value, int | float):
        raise _bad(name, value, "expected a number")
    if not math.isfinite(value):
        raise _bad(name, value, "must be a finite number")
    return kind(value)


def _check_field(f: dataclasses.Field, value: Any) -> Any:
    """Coerce and check one value against its field's metadata; returns the value to store."""
    meta, name = f.metadata, f.name
    kind = meta.get("kind")
    if value is None and f.default is not None and not meta.get("nullable"):
        raise _bad(name, value, f"needs a value (default: {f.default})")
    if value is None or kind is None:
        return value
    if kind == "pair":
        return _pairs(f, value)
    if kind is bool:
        if not isinstance(value, bool):
            raise _bad(name, value, "expected true or false")
        return value
    if kind is str and not meta.get("sequence"):
        if not isinstance(value, str):
            raise _bad(name, value, "expected a string")
        if "choices" in meta and value not in meta["choices"]:
            raise _bad(name, value, f"expected one of {', '.join(meta['choices'])}")
        return value
    if isinstance(value, list | tuple) and meta.get("sequence"):
        return tuple(_check_scalar(f, v) for v in value)
    return _check_scalar(f, value)


def _check_scalar(f: dataclasses.Field, value: Any) -> Any:
    if f.metadata["kind"] is not str:
        return _check_number(f, value)
    if not isinstance(value, str):
        raise _bad(f.name, value, "expected a string")
    return value


_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?|[-+]?(nan|inf)", re.IGNORECASE)


def as_list(value: Any) -> list:
    """A list or tuple as a list; anything else (a string, a number, a mapping) as one item."""
    return list(value) if isinstance(value, list | tuple) else [value]


def path_strength(text: str, name: str = "value") -> tuple[str, float]:
    """`PATH[:STRENGTH]`. A colon followed by a name (`C:\\x`, `repo:file.ckpt`) belongs to
    the path; followed by something that is neither a number nor a name, it is a mistake."""
    path, sep, tail = text.rpartition(":")
    number = _NUMBER.fullmatch(tail.strip())
    if not sep or not path or (not number and any(c in tail for c in "./\\_")):
        return text, 1.0
    try:
        strength = float(tail)
    except ValueError:
        detail = (
            f": bad strength {tail!r} in {text!r}: use PATH[:STRENGTH], e.g. style.safetensors:0.8"
        )
        raise OptionError(f"{name}{detail}", name, detail) from None
    if not math.isfinite(strength):
        raise _bad(name, text, "the strength must be a finite number")
    return path, strength


def _pair(name: str, value: Any) -> tuple[str, float]:
    """`"PATH[:S]"`, `(path, s)` or `[path, s]` -> (path, s), |s| <= MAX_STRENGTH."""
    if isinstance(value, str) or hasattr(value, "__fspath__"):
        path, strength = path_strength(str(value), name)
    elif isinstance(value, list | tuple) and len(value) == 2:
        path, strength = str(value[0]), _number(name, value[1], float)
    else:
        raise _bad(name, value, "expected PATH, PATH:STRENGTH or [PATH, STRENGTH]")
    if abs(strength) > MAX_STRENGTH:
        raise _bad(
            name, value, f"the strength must be within [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}]"
        )
    return path, strength


def _pairs(f: dataclasses.Field, value: Any):
    """One pair, or a tuple of pairs for fields that hold several (`action="append"`)."""
    if f.metadata.get("action") != "append":
        return _pair(f.name, value)
    if isinstance(value, str) or (
        isinstance(value, tuple)
        and len(value) == 2
        and not isinstance(value[1], str | tuple | list)
    ):
        value = [value]
    return tuple(_pair(f.name, v) for v in value)


def _check_number(f: dataclasses.Field, value: Any) -> int | float:
    meta, name = f.metadata, f.name
    value = _number(name, value, meta["kind"])
    if "minimum" in meta and value < meta["minimum"]:
        raise _bad(name, value, f"must be at least {meta['minimum']}")
    if "maximum" in meta and value > meta["maximum"]:
        raise _bad(name, value, f"must be at most {meta['maximum']}")
    if "below" in meta and value >= meta["below"]:
        raise _bad(name, value, f"must be below {meta['below']}")
    if "multiple" in meta and value % meta["multiple"]:
        lower = max(meta["multiple"], value // meta["multiple"] * meta["multiple"])
        raise _bad(name, value, f"must be a multiple of {meta['multiple']} (try {lower})")
    return value


class _Checked:
    """Frozen dataclasses whose fields are coerced and checked on construction."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _check_field(f, getattr(self, f.name)))


@dataclass(frozen=True)
class ModelOptions(_Checked):
    """Models: files, folders, hub ids or built-in names (see `animatediff models`)."""

    base: str | None = opt(
        None, "diffusers SD1.5 folder or hub id (default: the built-in model)", kind=str
    )
    motion_module: str | None = opt(
        None, "motion module: a file, folder, hub id or built-in name", kind=str
    )
    motion_version: str | None = opt(
        None, "override the detected motion-module version", kind=str, choices=("v1", "v2", "v3")
    )
    personal: str | None = opt(
        None, "single-file personalised checkpoint, or a built-in style", kind=str
    )
    vae: str | None = opt(None, "a separate VAE file", kind=str)
    loras: tuple[tuple[str, float], ...] = opt(
        (), "image LoRA (kohya/A1111 or diffusers), repeatable", flag="--lora", kind="pair",
        action="append", metavar="PATH[:STRENGTH]",
    )  # fmt: skip
    lora_scaling: str = opt(
        "kohya", "LoRA alpha convention", kind=str, choices=("kohya", "official")
    )
    motion_loras: tuple[tuple[str, float], ...] = opt(
        (), "MotionLoRA file or built-in name, repeatable", flag="--motion-lora", kind="pair",
        action="append", metavar="PATH[:STRENGTH]",
    )  # fmt: skip
    adapter: tuple[str, float] | None = opt(
        None, "v3 domain adapter", kind="pair", metavar="PATH[:SCALE]"
    )
    sparsectrl: str | None = opt(None, "SparseCtrl encoder (RGB or scribble)", kind=str)
    controlnets: tuple[str, ...] = opt(
        (), "SD1.5 ControlNet (folder, file or hub id), repeatable; PATH:SCALE sets its "
        "controlnet_scale", flag="--controlnet", kind=str, action="append", sequence=True,
        metavar="PATH[:SCALE]",
    )  # fmt: skip
    embeddings: tuple[str, ...] = opt(
        (), "textual-inversion embedding (A1111 .pt/.safetensors), used by its file name in "
        "prompts; repeatable", flag="--embedding", kind=str, action="append", sequence=True,
    )  # fmt: skip
    ip_adapter: str | None = opt(
        None, "IP-Adapter (ip-adapter_sd15, -plus, -plus-face); PATH:SCALE sets its scale",
        kind=str, metavar="PATH[:SCALE]",
    )  # fmt: skip
    image_encoder: str | None = opt(
        None, "the IP-Adapter's CLIP image encoder (default: image_encoder/ beside it, else "
        "ip-adapter-image-encoder)", kind=str,
    )  # fmt: skip
    dtype: str | None = opt(
        None, "precision (default: fp16 on CUDA, fp32 elsewhere)", kind=str,
        choices=("fp32", "fp16", "bf16"),
    )  # fmt: skip
    device: str = opt("auto", "auto, cpu, cuda, cuda:N or mps", kind=str)
    # Load-time memory and speed settings (README, "Performance").
    offload: str = opt(
        "none", "keep weights in RAM, each model on the device only while it runs: model "
        "(whole models) or sequential (the UNet layer by layer: least memory, slowest)",
        kind=str, choices=OFFLOAD_MODES,
    )  # fmt: skip
    compile: str = opt(
        "none", "torch.compile the UNet: regional (its repeated blocks, compiles fast) or "
        "full (one graph per UNet call); exact within the dtype's rounding", kind=str,
        choices=COMPILE_MODES,
    )  # fmt: skip
    cuda_graphs: bool = opt(
        False, "with --compile full on CUDA: replay the UNet as CUDA graphs", kind=bool
    )
    fuse_qkv: bool = opt(
        False, "fuse attention q/k/v projections (image and motion layers)", kind=bool
    )
    channels_last: bool = opt(False, "run the UNet's convolutions channels-last", kind=bool)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not DEVICE.fullmatch(self.device):
            raise _bad("device", self.device, "not a device (auto, cpu, cuda, cuda:N, mps)")
        if self.cuda_graphs and self.compile != "full":
            raise OptionError("--cuda-graphs needs --compile full (one graph per UNet call)")
        if self.offload == "sequential" and self.ip_adapter is not None:
            raise OptionError("--offload sequential cannot stream an IP-Adapter; use model")


@dataclass(frozen=True)
class SamplingOptions(_Checked):
    """Sampling: size, steps, guidance, seed, scheduler."""

    num_frames: int | None = opt(
        None, "frames (default: 16, or the init video's length)", flag="--frames", kind=int,
        minimum=1, maximum=MAX_FRAMES,
    )  # fmt: skip
    height: int | None = opt(
        None, "height in pixels (default: the model's native size)", kind=int, minimum=8,
        maximum=MAX_SIZE, multiple=8,
    )  # fmt: skip
    width: int | None = opt(
        None, "width in pixels (default: the model's native size)", kind=int, minimum=8,
        maximum=MAX_SIZE, multiple=8,
    )  # fmt: skip
    num_inference_steps: int | None = opt(
        None, "denoising steps (default: 25, or the preset's)", flag="--steps", kind=int,
        minimum=1, maximum=MAX_STEPS,
    )  # fmt: skip
    guidance_scale: float | None = opt(
        None, "classifier-free guidance, <= 1: no unconditional pass (default: 7.5, or the "
        "preset's)", kind=float, minimum=0, maximum=100,
    )  # fmt: skip
    seed: int | None = opt(
        None, "seed (default: random, printed and saved); video i of a batch uses seed + i",
        kind=int, minimum=0, maximum=2**63 - 1,
    )  # fmt: skip
    num_videos_per_prompt: int = opt(
        1, "videos per prompt", flag="--num-videos", kind=int, minimum=1, maximum=MAX_VIDEOS
    )
    scheduler: str | None = opt(
        None, "sampler (default: ddim, as the official inference, or the preset's)", kind=str,
        choices=SCHEDULER_NAMES,
    )  # fmt: skip
    scheduler_config: dict | None = opt(
        None, "overrides of the sampler's configuration (e.g. timestep_spacing)", cli=False
    )
    preset: str | None = opt(
        None, "sample as a few-step module's authors do (auto: from the motion module loaded)",
        kind=str, choices=PRESET_NAMES,
    )  # fmt: skip
    motion_scale: float | tuple[float, ...] = opt(
        1.0, "scale of the motion modules' effect (0: frame by frame); one value or one per "
        "frame", kind=float, minimum=0, maximum=10, sequence=True,
    )  # fmt: skip


@dataclass(frozen=True)
class ContextOptions(_Checked):
    """Context windows: clips longer than the motion module's training length are denoised in
    overlapping windows of `context_length` frames, fused per frame."""

    context_length: int | None = opt(
        16, "frames per window (0 or none: all frames at once)", kind=int, minimum=1,
        maximum=MAX_FRAMES, nullable=True,
    )  # fmt: skip
    context_overlap: int = opt(4, "frames shared by neighbouring windows", kind=int, minimum=0)
    context_stride: int = opt(
        1, "dilation levels (windows of frames 1, 2, 4 ... apart)", kind=int, minimum=1,
        maximum=8,
    )  # fmt: skip
    context_schedule: str = opt(
        "static", "where windows fall at each step", kind=str, choices=CONTEXT_SCHEDULES
    )
    context_fuse: str = opt("pyramid", "per-frame blending weights", kind=str, choices=FUSE_KINDS)
    context_views: bool = opt(
        False, "window only the motion modules (the image layers see all frames)", kind=bool
    )

    def __post_init__(self) -> None:
        off = self.context_length
        if off == 0 or (isinstance(off, str) and off.strip().lower() in ("0", "none", "off")):
            object.__setattr__(self, "context_length", None)  # as the CLI spells "no windows"
        super().__post_init__()
        if self.context_length is not None and self.context_overlap >= self.context_length:
            raise OptionError(
                f"context_overlap ({self.context_overlap}) must be smaller than "
                f"context_length ({self.context_length})"
            )

    @property
    def hop(self) -> int:
        """Distance between the starts of consecutive contiguous windows."""
        return self.context_length - self.context_overlap

    def applies(self, num_frames: int) -> bool:
        """Whether a clip of `num_frames` is cut into windows."""
        return self.context_length is not None and num_frames > self.context_length


@dataclass(frozen=True)
class NoiseOptions(_Checked):
    """Initial noise: FreeNoise, FreeInit, a frame-shared noise component."""

    freenoise: bool = opt(False, "FreeNoise: later windows reuse shuffled noise", kind=bool)
    freeinit_iterations: int = opt(
        0, "FreeInit sampling passes after the first", flag="--freeinit", kind=int, minimum=0,
        maximum=10,
    )  # fmt: skip
    freeinit_filter: str = opt(
        "butterworth", "FreeInit's low-pass filter", kind=str, choices=FREEINIT_FILTERS
    )
    shared_noise: float | None = opt(
        None, "fraction of the noise shared by all frames (default: what the motion module "
        "was trained with, 0 for the released ones)", kind=float, minimum=0, below=1,
    )  # fmt: skip


@dataclass(frozen=True)
class PromptOptions(_Checked):
    """Prompt travel and text encoding (prompts take A1111's (word:1.2) syntax, any length)."""

    prompt_head: str = opt("", "text before every prompt-map prompt", kind=str)
    prompt_tail: str = opt("", "text after every prompt-map prompt", kind=str)
    prompt_interpolation: str = opt(
        "linear", "how prompt-map embeddings blend between keyframes", kind=str,
        choices=INTERPOLATIONS,
    )  # fmt: skip
    clip_skip: int = opt(
        1, "text-encoder layer counted from the last, as A1111 (1: the last, 2: penultimate)",
        kind=int, minimum=1, maximum=12,
    )  # fmt: skip


@dataclass(frozen=True)
class ControlInputs(_Checked):
    """SparseCtrl keyframes, ControlNet images and IP-Adapter reference images.

    Each is paths, PIL images or tensors."""

    control_images: Any = opt(None, "SparseCtrl keyframes (images or a video)", nargs="+")
    control_frames: tuple[int, ...] | None = opt(
        None, "frame index of each keyframe", kind=int, nargs="+", sequence=True
    )
    control_scale: float = opt(1.0, "SparseCtrl strength", kind=float, minimum=0, maximum=10)
    control_sample: bool = opt(
        False, "sample RGB keyframes' latents instead of taking the mean", kind=bool
    )
    controlnet_images: Any = opt(
        None, "a video or folder of frames, one per --controlnet", action="append"
    )
    controlnet_scale: float | tuple[float, ...] = opt(
        1.0, "ControlNet strength (or PATH:SCALE in --controlnet)", kind=float, minimum=0,
        maximum=10, sequence=True, action="append",
    )  # fmt: skip
    controlnet_start: float | tuple[float, ...] = opt(
        0.0, "fraction of the steps where a ControlNet starts", kind=float, minimum=0, maximum=1,
        sequence=True, action="append",
    )  # fmt: skip
    controlnet_end: float | tuple[float, ...] = opt(
        1.0, "fraction of the steps where a ControlNet ends", kind=float, minimum=0, maximum=1,
        sequence=True, action="append",
    )  # fmt: skip

    ip_adapter_images: Any = opt(
        None, "IP-Adapter reference image(s): one for the clip, or one per frame", nargs="+"
    )
    ip_adapter_scale: float = opt(
        1.0, "IP-Adapter strength (or PATH:SCALE in --ip-adapter)", kind=float, minimum=0,
        maximum=10,
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.control_frames is not None and self.control_images is None:
            raise OptionError("control_frames needs control_images")


@dataclass(frozen=True)
class InitInputs(_Checked):
    """img2vid / vid2vid: start from an image or a video noised to `strength`."""

    init_image: Any = opt(None, "img2vid: start from this image")
    init_video: Any = opt(None, "vid2vid: start from this video")
    strength: float = opt(
        0.8, "how far the init is noised (0 keeps it, 1 ignores it)", kind=float, minimum=0,
        maximum=1,
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.init_image is not None and self.init_video is not None:
            raise OptionError("give init_image or init_video, not both")


@dataclass(frozen=True)
class OutputOptions(_Checked):
    """How denoised latents become the returned video."""

    fps: float = opt(8.0, "frames per second of saved videos", kind=float, minimum=0.1, maximum=240)
    decode_chunk_size: int = opt(
        16, "frames the VAE decodes at once", kind=int, minimum=1, maximum=MAX_FRAMES
    )


@dataclass(frozen=True)
class PerformanceOptions(_Checked):
    """Memory and speed: exact settings, and approximations (marked) that trade quality."""

    ff_chunks: int = opt(
        0, "feed-forward layers in N pieces (0: as many as a memory budget needs; 1: whole); "
        "exact", kind=int, minimum=0, maximum=MAX_FRAMES,
    )  # fmt: skip
    vae_tiling: str = opt(
        "auto", "decode frames in overlapping tiles (auto: above 768 pixels)", kind=str,
        choices=TILING,
    )  # fmt: skip
    deepcache_interval: int = opt(
        1, "approximate (DeepCache): the whole UNet every N steps, its deep features reused "
        "between (1: off)", kind=int, minimum=1, maximum=MAX_STEPS,
    )  # fmt: skip
    guidance_start: float = opt(
        0.0, "approximate: fraction of the steps before which guidance is skipped (the "
        "conditional pass alone)", kind=float, minimum=0, maximum=1,
    )  # fmt: skip
    guidance_end: float = opt(
        1.0, "approximate: fraction of the steps after which guidance is skipped", kind=float,
        minimum=0, maximum=1,
    )  # fmt: skip

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.guidance_start > self.guidance_end:
            raise OptionError(
                f"guidance_start ({self.guidance_start}) must not exceed guidance_end "
                f"({self.guidance_end})"
            )


GROUPS: dict[str, type] = {
    "sampling": SamplingOptions,
    "context": ContextOptions,
    "noise": NoiseOptions,
    "prompting": PromptOptions,
    "control": ControlInputs,
    "init": InitInputs,
    "output": OutputOptions,
    "performance": PerformanceOptions,
}
# Which group owns each option name (names are unique across groups).
OWNER: dict[str, str] = {f.name: g for g, cls in GROUPS.items() for f in dataclasses.fields(cls)}
assert len(OWNER) == sum(len(dataclasses.fields(c)) for c in GROUPS.values()), "duplicate name"


@dataclass(frozen=True)
class Options:
    """Every generation option, by concern."""

    sampling: SamplingOptions = field(default_factory=SamplingOptions)
    context: ContextOptions = field(default_factory=ContextOptions)
    noise: NoiseOptions = field(default_factory=NoiseOptions)
    prompting: PromptOptions = field(default_factory=PromptOptions)
    control: ControlInputs = field(default_factory=ControlInputs)
    init: InitInputs = field(default_factory=InitInputs)
    output: OutputOptions = field(default_factory=OutputOptions)
    performance: PerformanceOptions = field(default_factory=PerformanceOptions)

    @classmethod
    def build(
        cls, settings: Mapping[str, Any] | None = None, base: Options | None = None
    ) -> Options:
        """`base` (default: all defaults) with `settings` applied: flat option names
        (`num_frames=24`) or whole groups (`context=ContextOptions(...)`)."""
        base = base or cls()
        groups = {g: getattr(base, g) for g in GROUPS}
        flat: dict[str, dict[str, Any]] = {}
        for key, value in (settings or {}).items():
            if key in GROUPS:
                if not isinstance(value, GROUPS[key]):
                    raise OptionError(f"{key}: expected a {GROUPS[key].__name__}, got {value!r}")
                groups[key] = value
            elif key in OWNER:
                flat.setdefault(OWNER[key], {})[key] = value
            else:
                raise OptionError(f"unknown option {key!r}")
        for group, values in flat.items():
            groups[group] = dataclasses.replace(groups[group], **values)
        return cls(**groups)

    def flat(self) -> dict[str, Any]:
        """Every option by name."""
        return {f: getattr(getattr(self, g), f) for f, g in OWNER.items()}

    def to_json(self) -> dict[str, dict[str, Any]]:
        """Nested by group, JSON-safe (images given as objects become a short description)."""
        return {g: {k: _jsonable(v) for k, v in vars(getattr(self, g)).items()} for g in GROUPS}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Options:
        """The inverse of :meth:`to_json` (unknown groups or names are errors)."""
        flat: dict[str, Any] = {}
        for group, values in data.items():
            if group not in GROUPS:
                raise OptionError(f"unknown option group {group!r}")
            if not isinstance(values, Mapping):
                raise OptionError(f"option group {group!r}: expected a mapping of options")
            flat.update(values)
        return cls.build({k: list(v) if isinstance(v, tuple) else v for k, v in flat.items()})


def _jsonable(value: Any) -> Any:
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Mapping):  # scheduler_config
        return {str(k): _jsonable(v) for k, v in value.items()}
    if hasattr(value, "__fspath__"):
        return str(value)
    return f"<{type(value).__name__}>"
