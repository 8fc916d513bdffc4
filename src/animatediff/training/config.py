"""The training config: one YAML file, read into frozen dataclasses; unknown keys are errors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

STAGES = ("adapter", "motion", "motion_lora", "image_finetune")


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class DataConfig:
    videos: str | None = None  # folder of clips with same-name .txt captions
    csv: str | None = None  # WebVid layout: videoid, name[, page_dir]
    video_folder: str | None = None
    shards: str | None = None  # WebDataset tar pattern, e.g. "data/{000..009}.tar"
    num_frames: int = 16
    sample_stride: int = 4
    sample_size: tuple[int, int] = (256, 256)  # width, height
    hflip: bool = False
    num_workers: int = 2
    cache: str | None = None  # folder of pre-encoded latents (see `animatediff train --encode`)
    caption_dropout: float = 0.0

    def __post_init__(self):
        size = self.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        if len(size) != 2 or any(s % 8 for s in size):
            raise ConfigError(
                f"data.sample_size must be one number or [W, H], multiples of 8: {size}"
            )
        object.__setattr__(self, "sample_size", size)
        sources = [s for s in (self.videos, self.csv, self.shards, self.cache) if s]
        if not sources:
            raise ConfigError("data needs one of: videos, csv (+ video_folder), shards, cache")
        if self.csv and not self.video_folder:
            raise ConfigError("data.csv needs data.video_folder")


@dataclass(frozen=True)
class NoiseConfig:
    beta_schedule: str = "linear"  # AnimateDiff's; "scaled_linear" is SD's
    prediction_type: str = "epsilon"  # or "v_prediction"
    offset_noise: float = 0.0
    min_snr_gamma: float | None = None
    # Training timesteps are drawn uniformly from [lo, hi). A MotionLoRA learns where things go
    # at high noise, where the layout is decided; e.g. [400, 1000] spends its steps there.
    timesteps: tuple[int, int] = (0, 1000)
    # Video stages: the fraction of the noise variance shared by all frames of a clip (a mixed
    # noise prior, PYoCo). At high noise it ties the frames' layouts together, and the module
    # learns to draw on the other frames there. None: the motion module's own (0 for a new
    # one); the trained module stores it, and sampling draws its noise the same way.
    shared_noise: float | None = None

    def __post_init__(self):
        if self.shared_noise is not None and not 0 <= self.shared_noise < 1:
            raise ConfigError(f"noise.shared_noise must be in [0, 1): {self.shared_noise}")
        lo, hi = (int(t) for t in self.timesteps)
        if not 0 <= lo < hi <= 1000:
            raise ConfigError(
                f"noise.timesteps must be [lo, hi] with 0 <= lo < hi <= 1000: {[lo, hi]}"
            )
        object.__setattr__(self, "timesteps", (lo, hi))
        if self.beta_schedule not in ("linear", "scaled_linear"):
            raise ConfigError(
                f"noise.beta_schedule: {self.beta_schedule!r} (linear or scaled_linear)"
            )
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"noise.prediction_type: {self.prediction_type!r}")


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_size: int = 1  # per process
    learning_rate: float = 1e-4
    lr_scheduler: str = "constant"  # constant, cosine, linear (with warmup)
    warmup_steps: int = 0
    weight_decay: float = 1e-2
    max_grad_norm: float = 1.0
    rank: int = 2  # LoRA stages; the paper finds low ranks already learn a motion
    # motion stage: also train the image layers (the design the paper argues against; for
    # ablations). The fine-tuned UNet is saved beside the motion module.
    train_image_layers: bool = False
    # image_finetune: train the text encoder with the UNet (a frozen encoder that has never
    # learnt which word plays which part cannot be taught it by the UNet); saved as
    # `text_encoder/` beside `unet/`, the layout of a diffusers base folder.
    train_text_encoder: bool = False
    mixed_precision: str = "no"  # no, fp16, bf16
    gradient_checkpointing: bool = False
    gradient_accumulation: int = 1
    adam_8bit: bool = False
    ema_decay: float | None = None
    compile: bool = False
    seed: int = 0
    log_every: int = 1
    noise: NoiseConfig = field(default_factory=NoiseConfig)


@dataclass(frozen=True)
class ValidationConfig:
    prompts: tuple[str, ...] = ()
    every: int = 0  # 0: never
    num_frames: int = 16
    steps: int = 25
    guidance_scale: float = 7.5
    seed: int = 42


@dataclass(frozen=True)
class CheckpointConfig:
    every: int = 500
    keep: int = 3


@dataclass(frozen=True)
class Config:
    stage: str
    base: str | None
    output_dir: str
    data: DataConfig
    motion_module: str | None = None  # start from / continue
    motion_module_config: dict = field(
        default_factory=dict
    )  # from scratch: MotionModuleConfig fields
    adapter: str | None = None
    adapter_scale: float = 1.0
    train: TrainConfig = field(default_factory=TrainConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    report_to: tuple[str, ...] = ("tensorboard",)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


_NESTED = {
    Config: {
        "data": DataConfig,
        "train": TrainConfig,
        "validation": ValidationConfig,
        "checkpoint": CheckpointConfig,
    },
    TrainConfig: {"noise": NoiseConfig},
}


def _build(cls, data: Any, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"unknown key {where}{unknown[0]!r}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
        )
    kwargs = {}
    for key, value in data.items():
        sub = _NESTED.get(cls, {}).get(key)
        if sub is not None:
            value = _build(sub, value or {}, f"{where}{key}.")
        elif isinstance(value, list) and key in ("prompts", "report_to"):
            value = tuple(value)
        kwargs[key] = value
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where or 'config'}: {e}") from e


def parse_config(data: dict) -> Config:
    for key in ("stage", "output_dir", "data"):
        if key not in data:
            raise ConfigError(f"config needs '{key}'")
    config = _build(Config, data, "")
    if config.stage not in STAGES:
        raise ConfigError(f"stage {config.stage!r} is not one of {STAGES}")
    if config.train.train_text_encoder and config.stage != "image_finetune":
        raise ConfigError(
            f"train.train_text_encoder is for stage image_finetune, not {config.stage!r}"
        )
    if config.stage == "motion_lora" and not config.motion_module:
        raise ConfigError("stage motion_lora needs 'motion_module' (the module the LoRA adapts)")
    return config


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config not found: {path}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None
    return parse_config(data or {})
