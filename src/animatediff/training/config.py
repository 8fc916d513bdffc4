"""The training config: one YAML file, read into frozen dataclasses.

Every value is checked as it is read, by the rules the generation options follow
(`animatediff.options`): a field's metadata gives its type and limits; numbers may be written as
strings (YAML reads `1e-3` as one), must be finite and within their limits; a key that is unknown,
missing or wrong is a `ConfigError` naming it (`train.learning_rate ...`). Nothing here loads a
model or imports torch, so a mistake is reported in a fraction of a second.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import yaml

from ..errors import ConfigError
from ..options import MAX_FRAMES, MAX_SIZE, OptionError, _check_field, opt

STAGES = ("adapter", "motion", "motion_lora", "image_finetune", "distill")
VIDEO_STAGES = ("motion", "motion_lora", "distill")
LR_SCHEDULERS = ("constant", "linear", "cosine", "cosine_with_restarts", "polynomial")
TRACKERS = ("tensorboard", "wandb", "comet_ml", "aim", "mlflow", "clearml", "dvclive")
MAX_SEED = 2**32 - 1  # per-sample seeds are derived from it by multiplication: keep them in range
MAX_STEPS = 10**9


class _Section:
    """A config section whose fields are coerced and checked on construction (`opt` metadata:
    `kind`, `choices`, `minimum`, `maximum`, `below`, `multiple`, `sequence`, plus `above` for a
    strict lower bound). A field whose default is None may be None (null); others may not."""

    where: ClassVar[str] = ""  # the section's key prefix in error messages, e.g. "train."

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None and f.default is not None and f.metadata.get("kind"):
                raise ConfigError(f"{self.where}{f.name}: must be set (it cannot be null)")
            try:
                value = _check_field(f, value)
            except OptionError as e:
                detail = e.detail if e.detail is not None else f": {e}"
                raise ConfigError(f"{self.where}{f.name}{detail}") from None
            except OverflowError:  # an integer too large for a float
                raise ConfigError(f"{self.where}{f.name}: the number is too large") from None
            if "above" in f.metadata and value is not None and value <= f.metadata["above"]:
                raise ConfigError(
                    f"{self.where}{f.name} {value}: must be above {f.metadata['above']}"
                )
            object.__setattr__(self, f.name, value)
        self.check()

    def check(self) -> None:
        """Rules that involve several fields or a special shape (overridden per section)."""

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}{key}{message}")


def _pair(section: _Section, key: str, value: Any, kind: type) -> tuple:
    """One value or a two-element list -> a (lo, hi) tuple (already checked element-wise)."""
    pair = tuple(value) if isinstance(value, tuple) else (value, value)
    if len(pair) != 2:
        raise section.error(key, f" {list(pair)}: expected one number or [lo, hi]")
    return tuple(kind(v) for v in pair)


@dataclass(frozen=True)
class DataConfig(_Section):
    where: ClassVar[str] = "data."
    videos: str | None = opt(None, "folder of clips with same-name .txt captions", kind=str)
    csv: str | None = opt(None, "WebVid layout: videoid, name[, page_dir]", kind=str)
    video_folder: str | None = opt(None, "where the csv's videos are", kind=str)
    shards: str | None = opt(None, 'WebDataset tars, e.g. "data/{000..009}.tar"', kind=str)
    num_frames: int = opt(16, "frames per clip", kind=int, minimum=1, maximum=MAX_FRAMES)
    sample_stride: int = opt(4, "frames between sampled frames", kind=int, minimum=1)
    sample_size: tuple[int, int] = opt(
        (256, 256), "one number or [W, H]", kind=int, sequence=True, minimum=8, maximum=MAX_SIZE,
        multiple=8,
    )  # fmt: skip
    hflip: bool = opt(False, "random horizontal flips", kind=bool)
    num_workers: int = opt(2, "data-loading processes", kind=int, minimum=0, maximum=256)
    cache: str | None = opt(
        None, "folder of pre-encoded latents (`animatediff train --encode`)", kind=str
    )
    caption_dropout: float = opt(0.0, "share of empty captions", kind=float, minimum=0, maximum=1)

    def check(self) -> None:
        size = self.sample_size
        size = tuple(size) if isinstance(size, tuple) else (size, size)
        if len(size) != 2:
            raise self.error("sample_size", f" {list(size)}: expected one number or [W, H]")
        object.__setattr__(self, "sample_size", size)
        sources = [s for s in (self.videos, self.csv, self.shards, self.cache) if s]
        if not sources:
            raise ConfigError("data needs one of: videos, csv (+ video_folder), shards, cache")
        if self.csv and not self.video_folder:
            raise ConfigError("data.csv needs data.video_folder")


@dataclass(frozen=True)
class NoiseConfig(_Section):
    where: ClassVar[str] = "train.noise."
    beta_schedule: str = opt(
        "linear", "AnimateDiff's; scaled_linear is SD's", kind=str,
        choices=("linear", "scaled_linear"),
    )  # fmt: skip
    prediction_type: str = opt(
        "epsilon", "what the UNet predicts", kind=str, choices=("epsilon", "v_prediction")
    )
    offset_noise: float = opt(0.0, "per-channel noise offset", kind=float, minimum=0, maximum=1)
    min_snr_gamma: float | None = opt(None, "Min-SNR weighting", kind=float, above=0, maximum=1e3)
    # Training timesteps are drawn uniformly from [lo, hi). A MotionLoRA learns where things go
    # at high noise, where the layout is decided; e.g. [400, 1000] spends its steps there.
    timesteps: tuple[int, int] = opt(
        (0, 1000), "[lo, hi)", kind=int, sequence=True, minimum=0, maximum=1000
    )
    # Video stages: the fraction of the noise variance shared by all frames of a clip (a mixed
    # noise prior, PYoCo). At high noise it ties the frames' layouts together, and the module
    # learns to draw on the other frames there. None: the motion module's own (0 for a new
    # one); the trained module stores it, and sampling draws its noise the same way.
    shared_noise: float | None = opt(
        None, "frame-shared noise fraction (video stages)", kind=float, minimum=0, below=1
    )

    def check(self) -> None:
        steps = self.timesteps
        if not isinstance(steps, tuple) or len(steps) != 2 or not steps[0] < steps[1]:
            shown = list(steps) if isinstance(steps, tuple) else steps
            raise self.error("timesteps", f" {shown}: expected [lo, hi] with lo < hi")


@dataclass(frozen=True)
class TrainConfig(_Section):
    where: ClassVar[str] = "train."
    steps: int = opt(1000, "optimisation steps", kind=int, minimum=1, maximum=MAX_STEPS)
    batch_size: int = opt(1, "per process", kind=int, minimum=1, maximum=65536)
    learning_rate: float = opt(1e-4, "AdamW's", kind=float, above=0, maximum=10)
    lr_scheduler: str = opt("constant", "with warmup_steps", kind=str, choices=LR_SCHEDULERS)
    warmup_steps: int = opt(0, "", kind=int, minimum=0, maximum=MAX_STEPS)
    weight_decay: float = opt(1e-2, "AdamW's", kind=float, minimum=0, maximum=10)
    max_grad_norm: float = opt(1.0, "0: no clipping", kind=float, minimum=0)
    # LoRA stages; the paper finds low ranks already learn a motion
    rank: int = opt(2, "LoRA rank", kind=int, minimum=1, maximum=4096)
    # motion stage: also train the image layers (the design the paper argues against; for
    # ablations). The fine-tuned UNet is saved beside the motion module.
    train_image_layers: bool = opt(False, "", kind=bool)
    # image_finetune: train the text encoder with the UNet (a frozen encoder that has never
    # learnt which word plays which part cannot be taught it by the UNet); saved as
    # `text_encoder/` beside `unet/`, the layout of a diffusers base folder.
    train_text_encoder: bool = opt(False, "image_finetune: train the text encoder", kind=bool)
    mixed_precision: str = opt("no", "", kind=str, choices=("no", "fp16", "bf16"))
    gradient_checkpointing: bool = opt(False, "", kind=bool)
    gradient_accumulation: int = opt(1, "micro-steps per step", kind=int, minimum=1, maximum=4096)
    adam_8bit: bool = opt(False, "needs bitsandbytes", kind=bool)
    ema_decay: float | None = opt(
        None, "EMA of the trained weights", kind=float, minimum=0, below=1
    )
    compile: bool = opt(False, "torch.compile", kind=bool)
    seed: int = opt(0, "decides the whole run", kind=int, minimum=0, maximum=MAX_SEED)
    log_every: int = opt(1, "steps between metrics lines", kind=int, minimum=1)
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass(frozen=True)
class ValidationConfig(_Section):
    where: ClassVar[str] = "validation."
    prompts: tuple[str, ...] = opt((), "prompts to sample", kind=str, sequence=True)
    every: int = opt(0, "steps; 0: never", kind=int, minimum=0)
    num_frames: int = opt(16, "", kind=int, minimum=1, maximum=MAX_FRAMES)
    steps: int = opt(25, "sampling steps", kind=int, minimum=1, maximum=1000)
    guidance_scale: float = opt(7.5, "", kind=float, minimum=0, maximum=100)
    seed: int = opt(42, "", kind=int, minimum=0, maximum=MAX_SEED)

    def check(self) -> None:
        if isinstance(self.prompts, str):
            object.__setattr__(self, "prompts", (self.prompts,))


@dataclass(frozen=True)
class CheckpointConfig(_Section):
    where: ClassVar[str] = "checkpoint."
    every: int = opt(500, "steps; 0: only when stopped", kind=int, minimum=0)
    keep: int = opt(3, "the last N are kept", kind=int, minimum=1)


@dataclass(frozen=True)
class DistillConfig(_Section):
    """Consistency distillation (the `distill` stage; see `training/distill.py`)."""

    where: ClassVar[str] = "distill."
    num_inference_steps: int = opt(
        4, "the step count the student is made for (its preset, validation)", kind=int,
        minimum=1, maximum=50,
    )  # fmt: skip
    # The teacher's ODE is solved with DDIM over `1000 // solver_steps` timesteps at a time; the
    # LCM sampler's `original_inference_steps` (50) must be the same.
    solver_steps: int = opt(50, "DDIM solver grid", kind=int, minimum=2, maximum=500)
    # Folded into the teacher: guidance drawn per sample from [lo, hi] (one number: fixed), in
    # the usual classifier-free convention (1: none; 7.5: SD's default).
    guidance_scale: tuple[float, float] = opt(
        (7.5, 7.5), "one number or [lo, hi]", kind=float, sequence=True, minimum=1, maximum=30
    )
    target_ema: float = opt(0.95, "EMA rate of the target network", kind=float, minimum=0, below=1)
    loss: str = opt("huber", "consistency loss", kind=str, choices=("huber", "l2"))
    huber_c: float = opt(1e-3, "", kind=float, above=0, maximum=10)
    timestep_scaling: float = opt(10.0, "boundary-condition scale", kind=float, above=0)
    # A LoRA on the image layers' attention trained with the motion module (0: none): what
    # AnimateLCM's spatial LoRA does when the motion module alone cannot absorb the change.
    lora_rank: int = opt(0, "image-layer LoRA rank", kind=int, minimum=0, maximum=4096)

    def check(self) -> None:
        lo, hi = _pair(self, "guidance_scale", self.guidance_scale, float)
        if lo > hi:
            raise self.error("guidance_scale", f" {[lo, hi]}: expected [lo, hi] with lo <= hi")
        object.__setattr__(self, "guidance_scale", (lo, hi))


@dataclass(frozen=True)
class MotionModuleOverrides(_Section):
    """`motion_module_config`: fields of a new motion module (or max_frames of a continued
    one); unset ones come from the version's preset and the image UNet."""

    where: ClassVar[str] = "motion_module_config."
    version: str | None = opt(None, "", kind=str, choices=("v1", "v2", "v3"))
    max_frames: int | None = opt(None, "", kind=int, minimum=1, maximum=MAX_FRAMES)
    mid_block: bool | None = opt(None, "", kind=bool)
    num_attention_heads: int | None = opt(None, "", kind=int, minimum=1, maximum=1024)
    num_transformer_blocks: int | None = opt(None, "", kind=int, minimum=1, maximum=64)
    norm_num_groups: int | None = opt(None, "", kind=int, minimum=1, maximum=1024)
    temporal_attention_dim_div: int | None = opt(None, "", kind=int, minimum=1, maximum=64)
    groupnorm_across_frames: bool | None = opt(None, "", kind=bool)
    zero_init: bool | None = opt(None, "", kind=bool)
    layers_per_block: int | None = opt(None, "", kind=int, minimum=1, maximum=16)
    block_out_channels: tuple[int, ...] | None = opt(
        None, "", kind=int, sequence=True, minimum=1, maximum=65536
    )

    def given(self) -> dict:
        """The fields that were set."""
        return {k: v for k, v in vars(self).items() if v is not None}


@dataclass(frozen=True)
class Config(_Section):
    stage: str = opt(None, "what to train", kind=str, choices=STAGES)
    base: str | None = opt(None, "SD1.5 folder or hub id (null: the built-in model)", kind=str)
    output_dir: str = opt(None, "where the run writes", kind=str)
    data: DataConfig | None = None
    # start from / continue; for distill: the teacher
    motion_module: str | None = opt(None, "motion module file", kind=str)
    motion_module_config: dict = field(default_factory=dict)  # MotionModuleOverrides fields
    adapter: str | None = opt(None, "domain adapter merged while training", kind=str)
    adapter_scale: float = opt(1.0, "", kind=float, minimum=-10, maximum=10)
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    report_to: tuple[str, ...] = opt(("tensorboard",), "trackers", kind=str, sequence=True)

    def check(self) -> None:
        for key in ("stage", "output_dir", "data"):
            if getattr(self, key) is None:
                raise ConfigError(f"config needs '{key}'")
        if self.report_to is not None and isinstance(self.report_to, str):
            object.__setattr__(self, "report_to", (self.report_to,))
        for tracker in self.report_to:
            if tracker not in TRACKERS:
                raise ConfigError(f"report_to {tracker!r}: expected some of {', '.join(TRACKERS)}")
        if self.stage in ("motion_lora", "distill") and not self.motion_module:
            what = "the module the LoRA adapts" if self.stage == "motion_lora" else "the teacher"
            raise ConfigError(f"stage {self.stage} needs 'motion_module' ({what})")
        if self.train.train_text_encoder and self.stage != "image_finetune":
            raise ConfigError(
                f"train.train_text_encoder is for stage image_finetune, not {self.stage!r}"
            )

    @property
    def video(self) -> bool:
        """Whether the stage trains on clips (else on single frames)."""
        return self.stage in VIDEO_STAGES

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "train": TrainConfig,
    "validation": ValidationConfig,
    "checkpoint": CheckpointConfig,
    "distill": DistillConfig,
    "noise": NoiseConfig,  # inside train
    "motion_module_config": MotionModuleOverrides,
}
_NESTED = {
    Config: ("data", "train", "validation", "checkpoint", "distill", "motion_module_config"),
    TrainConfig: ("noise",),
}


def _build(cls: type, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where.rstrip('.') or 'config'} must be a mapping, not {data!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in names)
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
        )
    kwargs = {}
    for key, value in data.items():
        if key in _NESTED.get(cls, ()):
            value = _build(SECTIONS[key], {} if value is None else value, f"{where}{key}.")
            if key == "motion_module_config":
                value = value.given()
        kwargs[key] = value
    return cls(**kwargs)


def parse_config(data: Any) -> Config:
    """A `Config` from a mapping as in the YAML; raises `ConfigError` naming the first wrong key."""
    if not isinstance(data, dict):
        raise ConfigError(f"a training config must be a mapping of keys, not {type(data).__name__}")
    for key in ("stage", "output_dir", "data"):
        if key not in data:
            raise ConfigError(f"config needs '{key}'")
    return _build(Config, data, "")


def load_config(path: str | Path) -> Config:
    """Read and check a YAML training config."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path}: is a folder; expected a training config YAML file")
    if not path.exists():
        raise ConfigError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot be read ({e})") from None
    return parse_config({} if data is None else data)
