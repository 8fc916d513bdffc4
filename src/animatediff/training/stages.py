"""What each training stage trains, on top of the frozen image model.

A stage builds a `TrainModel`: one module holding the frozen parts and the trainable ones, whose
forward is the noise prediction, so that data-parallel wrappers see every trainable parameter.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from ..checkpoints.adapters import attention_lora_pairs
from ..checkpoints.base import ImageModel
from ..checkpoints.fewstep import Release, release_metadata
from ..checkpoints.io import save_state_dict
from ..checkpoints.lora import to_official_layout
from ..checkpoints.motion import load_motion_module, save_motion_module
from ..lora import LoRASet, merge_lora
from ..motion import MotionModuleConfig, MotionModules, MotionUNet
from .config import Config, ConfigError

SPATIAL_ATTENTION = (
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
)
MOTION_ATTENTION = ("to_q", "to_k", "to_v", "to_out.0")
# Every file or folder a stage may write into output_dir (`save_results`).


def spatial_attention_targets(unet: nn.Module) -> list[str]:
    """q/k/v/out of every attn1 and attn2 in the image UNet (the domain adapter's layers)."""
    return [
        n for n, _ in unet.named_modules() if n.endswith(SPATIAL_ATTENTION) and ".attentions." in n
    ]


def motion_attention_targets(motion: MotionModules) -> list[str]:
    return [
        n
        for n, _ in motion.named_modules()
        if ".attention_blocks." in n and n.endswith(MOTION_ATTENTION)
    ]


def _group_norm(norm: nn.GroupNorm, x: torch.Tensor) -> torch.Tensor:
    """GroupNorm from elementwise ops: the same result, and a backward that avoids PyTorch's
    CPU GroupNorm backward kernel, which crashes (seen in 2.13) on some layouts."""
    groups = x.reshape(x.shape[0], norm.num_groups, -1)
    mean = groups.mean(-1, keepdim=True)
    var = groups.var(-1, unbiased=False, keepdim=True)
    out = ((groups - mean) * torch.rsqrt(var + norm.eps)).reshape(x.shape)
    if norm.affine:
        shape = (1, -1) + (1,) * (x.ndim - 2)
        out = out * norm.weight.view(shape) + norm.bias.view(shape)
    return out


def use_safe_groupnorm(model: nn.Module) -> None:
    """On CPU, give every GroupNorm instance of `model` the elementwise forward above."""
    for module in model.modules():
        if isinstance(module, nn.GroupNorm):
            module.forward = functools.partial(_group_norm, module)


class TrainModel(nn.Module):
    """Frozen image model + the stage's trainable part; forward = noise prediction."""

    def __init__(self, config: Config, image: ImageModel):
        super().__init__()
        self.stage = config.stage
        self.unet2d = image.unet
        self.unet2d.requires_grad_(False)
        self.motion: MotionModules | None = None
        self.lora: LoRASet | None = None
        self.text_encoder: nn.Module | None = None
        self.video = config.video
        self.shared_noise = 0.0  # video stages: the noise prior trained with (set below)
        # distill: the teacher's motion module and the target network (an EMA of the student)
        self.teacher_motion: MotionModules | None = None
        self.target_motion: MotionModules | None = None
        self.target_lora: LoRASet | None = None
        if config.adapter and config.video:
            merge_lora(
                self.unet2d,
                attention_lora_pairs(self.unet2d, config.adapter, "domain adapter"),
                config.adapter_scale,
            )
        getattr(self, f"_build_{config.stage}")(config)
        if config.train.train_text_encoder:  # image_finetune only (the config checks)
            # A submodule, so that it is trained, checkpointed and wrapped by Accelerate with
            # the UNet; forward then takes token ids.
            self.text_encoder = image.text_encoder.requires_grad_(True)
        self.motion_unet = MotionUNet(self.unet2d, self.motion) if self.video else None
        if self.teacher_motion is not None:
            self.teacher_unet = MotionUNet(self.unet2d, self.teacher_motion)
            self.target_unet = MotionUNet(self.unet2d, self.target_motion)

    def _build_adapter(self, config: Config) -> None:
        targets = spatial_attention_targets(self.unet2d)
        self.lora = LoRASet.create(self.unet2d, targets, config.train.rank).attach(self.unet2d)

    def _build_image_finetune(self, config: Config) -> None:
        self.unet2d.requires_grad_(True)

    def _build_motion(self, config: Config) -> None:
        frames = config.data.num_frames
        if config.motion_module:
            self.motion = _continued_module(config)
        else:
            fields = {"version": "v3", **config.motion_module_config}
            preset = MotionModuleConfig.preset(fields.pop("version"))
            fields.setdefault("block_out_channels", tuple(self.unet2d.config.block_out_channels))
            fields.setdefault("layers_per_block", self.unet2d.config.layers_per_block)
            fields.setdefault("max_frames", max(preset.max_frames, frames))
            self.motion = MotionModules(preset.replace(**fields))
        self._set_shared_noise(config)
        self.motion.requires_grad_(True)
        if config.train.train_image_layers:
            self.unet2d.requires_grad_(True)

    def _build_motion_lora(self, config: Config) -> None:
        self.motion = load_motion_module(config.motion_module)
        self._set_shared_noise(config)
        self.motion.requires_grad_(False)
        targets = motion_attention_targets(self.motion)
        self.lora = LoRASet.create(self.motion, targets, config.train.rank).attach(self.motion)

    def _build_distill(self, config: Config) -> None:
        """Student and target start as copies of the teacher (AnimateLCM initialises from it)."""
        self.teacher_motion = _continued_module(config).requires_grad_(False)
        self.motion = copy.deepcopy(self.teacher_motion).requires_grad_(True)
        self._set_shared_noise(config)  # the student samples with the teacher's noise prior
        self.target_motion = copy.deepcopy(self.teacher_motion)
        rank = config.distill.lora_rank
        if rank:
            targets = spatial_attention_targets(self.unet2d)
            self.lora = LoRASet.create(self.unet2d, targets, rank).attach(self.unet2d)
            self.target_lora = LoRASet.create(self.unet2d, targets, rank)
            self.target_lora.layers.load_state_dict(self.lora.layers.state_dict())
            self.target_lora.requires_grad_(False).attach(self.unet2d)
            self.target_lora.strength = 0.0  # the student's LoRA is the one active by default

    @contextlib.contextmanager
    def _loras(self, student: float, target: float) -> Iterator[None]:
        """Within the block, the student's and the target's image LoRAs at these strengths."""
        if self.lora is None or self.target_lora is None:
            yield
            return
        self.lora.strength, self.target_lora.strength = student, target
        try:
            yield
        finally:
            self.lora.strength, self.target_lora.strength = 1.0, 0.0

    @torch.no_grad()
    def teacher(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor, uncond):
        """distill: the teacher's outputs with the captions and with the empty prompt."""
        with self._loras(0.0, 0.0):
            both = self.teacher_unet(
                torch.cat([noisy, noisy]), torch.cat([t, t]), torch.cat([text, uncond])
            )
        return both.chunk(2)

    @torch.no_grad()
    def target(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """distill: the target network's output."""
        with self._loras(0.0, 1.0):
            return self.target_unet(noisy, t, text)

    @torch.no_grad()
    def update_target(self, rate: float) -> None:
        """target <- rate * target + (1 - rate) * student, after each optimisation step."""
        student = self.trainable_state_dict()
        for name, value in self.target_state_dict().items():
            value.lerp_(student[name], 1 - rate)

    def target_state_dict(self) -> dict[str, torch.Tensor]:
        """distill: the target network's weights, named as the student's trainable ones."""
        parts = {"motion.": self.target_motion}
        if self.target_lora is not None:  # (a LoRASet also holds the model it is attached to)
            parts["lora.layers."] = self.target_lora.layers
        return {p + k: v for p, module in parts.items() for k, v in module.named_parameters()}

    def _set_shared_noise(self, config: Config) -> None:
        """The noise prior of this run: the config's, else the module's own; stored in the
        module's config, so that the saved module (and validation) samples with it."""
        shared = config.train.noise.shared_noise
        self.shared_noise = self.motion.config.shared_noise if shared is None else shared
        self.motion.config = self.motion.config.replace(shared_noise=self.shared_noise)

    def trainable(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def set_gradient_checkpointing(self, on: bool) -> None:
        if on and self.stage in ("adapter", "image_finetune"):
            self.unet2d.enable_gradient_checkpointing()
        if self.motion_unet is not None:
            self.motion_unet.gradient_checkpointing = on

    def forward(self, noisy: torch.Tensor, t: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """noisy (b, c, f, h, w) for video stages, (b, c, h, w) for image stages; text: the
        prompt embeddings, or token ids when the text encoder is trained."""
        if self.text_encoder is not None:
            text = self.text_encoder(text)[0]
        if self.video:
            return self.motion_unet(noisy, t, text)
        return self.unet2d(noisy, t, text, return_dict=False)[0]

    # -- results -------------------------------------------------------------------------------
    def save_results(self, folder: Path, config: Config, step: int) -> list[Path]:
        """Write what the stage produced, in the layouts `AnimationPipeline.load` reads."""
        meta = {
            "animatediff.training_config": _json(config.to_dict()),
            "animatediff.step": str(step),
        }
        folder.mkdir(parents=True, exist_ok=True)
        if self.stage == "distill":
            return self._save_distilled(folder, config, meta)
        if self.stage == "motion":
            unet = []
            if config.train.train_image_layers:
                self.unet2d.save_pretrained(folder / "unet")
                unet = [folder / "unet"]
            return unet + _save_motion_files(self.motion, folder, meta)
        if self.stage in ("motion_lora", "adapter"):
            name = (
                "motion_lora.safetensors"
                if self.stage == "motion_lora"
                else "domain_adapter.safetensors"
            )
            layout = to_official_layout(self.lora.pairs())
            return [
                save_state_dict(
                    {k: v.float().cpu() for k, v in layout.items()},
                    folder / name,
                    metadata={**meta, "animatediff.rank": str(config.train.rank)},
                )
            ]
        self.unet2d.save_pretrained(folder / "unet")
        if self.text_encoder is None:
            return [folder / "unet"]
        self.text_encoder.save_pretrained(folder / "text_encoder")
        return [folder / "unet", folder / "text_encoder"]

    def _save_distilled(self, folder: Path, config: Config, meta: dict) -> list[Path]:
        """The student motion module (and image LoRA), carrying the release metadata that makes
        `--preset auto` sample it with the LCM sampler for its step count."""
        steps = config.distill.num_inference_steps
        release = Release(f"AnimateDiff consistency-distilled {steps}-step", "animatelcm", steps)
        meta = {**meta, **release_metadata(release)}
        paths = _save_motion_files(self.motion, folder, meta)
        if self.lora is not None:
            layout = to_official_layout(self.lora.pairs())
            tensors = {k: v.float().cpu() for k, v in layout.items()}
            rank = {"animatediff.rank": str(config.distill.lora_rank)}
            path = save_state_dict(tensors, folder / "distill_lora.safetensors", {**meta, **rank})
            paths.append(path)
        return paths


def _save_motion_files(motion: MotionModules, folder: Path, meta: dict) -> list[Path]:
    """A trained motion module in both layouts: the official file and a diffusers folder."""
    return [
        save_motion_module(motion, folder / "motion_module.safetensors", extra_metadata=meta),
        save_motion_module(
            motion, folder / "motion_module_diffusers", layout="diffusers", extra_metadata=meta
        ),
    ]


def _continued_module(config: Config) -> MotionModules:
    """`config.motion_module`, loaded, with max_frames raised to the config's if it asks."""
    module = load_motion_module(config.motion_module)
    frames = config.data.num_frames
    limit = config.motion_module_config.get("max_frames", module.config.max_frames)
    if frames > limit:
        raise ConfigError(
            f"data.num_frames {frames} exceeds the {module.config.max_frames} frames "
            f"{config.motion_module} supports; set motion_module_config.max_frames to extend it"
        )
    module.config = module.config.replace(max_frames=limit)
    return module


def _json(data) -> str:
    return json.dumps(data, default=str, sort_keys=True)
