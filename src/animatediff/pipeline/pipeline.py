"""`AnimationPipeline`: text -> video with a motion module inserted into an SD1.5 model.

The sampling loop is the official AnimateDiff one: noise drawn once in the layout
(b, 4, f, h/8, w/8), classifier-free guidance with the unconditional and conditional batches
run together, the scheduler stepping all frames jointly, then the VAE decoding frame by frame.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints.adapters import apply_image_lora, attention_lora_pairs
from ..checkpoints.base import ImageModel, load_base, load_single_file, load_vae_file
from ..checkpoints.motion import load_motion_module
from ..lora import LoRASet, merge_lora
from ..motion.module import MotionModules
from ..motion.unet import MotionUNet
from ..video import Video
from .prompt import encode_prompts
from .schedulers import make_scheduler

LATENT_CHANNELS = 4


def _as_list(x: str | Sequence[str]) -> list[str]:
    return [x] if isinstance(x, str) else list(x)


def _strength_pairs(items) -> list[tuple[str, float]]:
    """Accept `path`, `(path, strength)` or a list of either."""
    if items is None:
        return []
    if isinstance(items, (str, Path)) or (
        isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], (int, float))
    ):
        items = [items]
    return [
        (str(i), 1.0) if isinstance(i, (str, Path)) else (str(i[0]), float(i[1])) for i in items
    ]


class AnimationPipeline:
    """Load with :meth:`load`, call to generate. Attributes: `tokenizer`, `text_encoder`, `vae`,
    `unet` (a :class:`MotionUNet`), `scheduler`, `motion_loras` (name -> :class:`LoRASet`)."""

    def __init__(self, image: ImageModel, unet: MotionUNet, scheduler: str = "ddim"):
        self.tokenizer = image.tokenizer
        self.text_encoder = image.text_encoder
        self.vae = image.vae
        self.unet = unet
        self.scheduler_name = scheduler
        self.scheduler = make_scheduler(scheduler)
        self.motion_loras: dict[str, LoRASet] = {}
        self.sources: dict[str, object] = {}

    # -- loading -----------------------------------------------------------------------------
    @classmethod
    def load(
        cls,
        base: str | Path | None = None,
        motion_module: str | Path | MotionModules | None = None,
        personal: str | Path | None = None,
        vae: str | Path | None = None,
        loras=None,
        motion_loras=None,
        adapter=None,
        motion_version: str | None = None,
        lora_scaling: str = "kohya",
        scheduler: str = "ddim",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> AnimationPipeline:
        """Build a pipeline from files.

        base: diffusers SD1.5 folder or hub id (None: the built-in model). motion_module: any
        supported motion-module file (None with no base: the built-in one); version detected,
        or `motion_version`. personal: single-file LDM checkpoint replacing UNet, VAE and text
        encoder. loras: `[(path, strength), ...]` image LoRAs (kohya or diffusers), merged with
        `lora_scaling` ("kohya": alpha / rank, the default; "official": alpha ignored).
        motion_loras: `[(path, strength), ...]`, attached removably. adapter: `(path, scale)`,
        the v3 domain adapter, merged.
        """
        if base is None:
            from ..builtin import builtin_model

            builtin = builtin_model()
            base = builtin.base
            motion_module = builtin.motion_module if motion_module is None else motion_module
        if motion_module is None:
            raise ValueError("a motion module is needed with a custom base (motion_module=...)")
        image = load_base(base, dtype=torch.float32)
        if personal is not None:
            load_single_file(image, personal)
        if vae is not None:
            load_vae_file(image, vae)
        for path, strength in _strength_pairs(loras):
            apply_image_lora(image, path, strength, lora_scaling)
        if adapter is not None:
            ((path, scale),) = _strength_pairs(adapter)
            merge_lora(image.unet, attention_lora_pairs(image.unet, path, "domain adapter"), scale)
        motion = (
            motion_module
            if isinstance(motion_module, MotionModules)
            else load_motion_module(motion_module, version=motion_version)
        )
        pipe = cls(image, MotionUNet(image.unet, motion), scheduler=scheduler)
        pipe.sources = dict(
            base=str(base),
            motion_module=str(motion_module),
            personal=personal,
            loras=_strength_pairs(loras),
            adapter=adapter,
        )
        for path, strength in _strength_pairs(motion_loras):
            pipe.add_motion_lora(path, strength)
        return pipe.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move; `dtype` applies to UNet, motion modules and text encoder. In fp16 the VAE stays
        fp32: SD1.5's VAE overflows in fp16."""
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        for module, dt in ((self.text_encoder, dtype), (self.unet, dtype), (self.vae, vae_dtype)):
            module.to(device=device, dtype=dt if dt != module.dtype else None)
        for lora in self.motion_loras.values():
            lora.to(device=device)
        return self

    @property
    def default_size(self) -> int:
        return self.unet.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    # -- MotionLoRA ----------------------------------------------------------------------------
    def add_motion_lora(
        self, lora: str | Path | LoRASet, strength: float = 1.0, name: str | None = None
    ) -> str:
        """Attach a MotionLoRA (official or diffusers format); returns its name."""
        if not isinstance(lora, LoRASet):
            name = name or Path(lora).stem
            pairs = attention_lora_pairs(self.unet.motion, lora, "MotionLoRA")
            lora = LoRASet.from_pairs(self.unet.motion, pairs)
        name = name or f"lora{len(self.motion_loras)}"
        if name in self.motion_loras:
            raise ValueError(f"a MotionLoRA named {name!r} is already attached")
        lora.strength = strength
        self.motion_loras[name] = lora.to(self.device).attach(self.unet.motion)
        return name

    def remove_motion_lora(self, name: str) -> None:
        self.motion_loras.pop(name).detach()

    def set_motion_lora_strength(self, name: str, strength: float) -> None:
        self.motion_loras[name].strength = strength

    # -- generation ----------------------------------------------------------------------------
    def encode(self, prompts: list[str], negative: list[str], guidance: bool) -> torch.Tensor:
        """[uncond; cond] text embeddings (or cond alone without guidance)."""
        cond = encode_prompts(self.tokenizer, self.text_encoder, prompts)
        if not guidance:
            return cond
        return torch.cat([encode_prompts(self.tokenizer, self.text_encoder, negative), cond])

    def generator(self, seed: int | None) -> torch.Generator | None:
        """The official code seeds the generator of the device that draws the noise (the CPU
        for mps): same seed and device, same noise."""
        if seed is None:
            return None
        return torch.Generator("cpu" if self.device.type == "mps" else self.device).manual_seed(
            seed
        )

    def prepare_latents(
        self,
        batch: int,
        num_frames: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        latents: torch.Tensor | None,
        scheduler,
    ) -> torch.Tensor:
        factor = self.vae_scale_factor
        shape = (batch, LATENT_CHANNELS, num_frames, height // factor, width // factor)
        if latents is None:  # drawn at once, in the official layout
            latents = torch.randn(shape, generator=generator, device=generator.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32) * scheduler.init_noise_sigma

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | Sequence[str],
        negative_prompt: str | Sequence[str] | None = None,
        num_frames: int = 16,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 25,
        guidance_scale: float = 7.5,
        seed: int | None = None,
        latents: torch.Tensor | None = None,
        num_videos_per_prompt: int = 1,
        scheduler: str | None = None,
        decode_chunk_size: int = 16,
        fps: float = 8,
        progress: bool = True,
    ) -> Video:
        """Generate `len(prompt) * num_videos_per_prompt` videos of `num_frames` frames.

        height/width default to the model's native size (512 for SD1.5). `latents`
        (b, 4, f, h/8, w/8) replace the seeded noise.
        """
        height = height or self.default_size
        width = width or self.default_size
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        prompts = _as_list(prompt)
        negatives = _as_list(negative_prompt if negative_prompt is not None else "")
        if len(negatives) == 1:
            negatives = negatives * len(prompts)
        if len(negatives) != len(prompts):
            raise ValueError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        seed = secrets.randbelow(2**31) if seed is None and latents is None else seed
        sched = make_scheduler(scheduler) if scheduler else self.scheduler
        guidance = guidance_scale > 1.0
        text = self.encode(prompts, negatives, guidance).to(self.dtype)
        text = text.repeat_interleave(num_videos_per_prompt, dim=0)
        batch = len(prompts) * num_videos_per_prompt
        generator = self.generator(seed)
        latents = self.prepare_latents(batch, num_frames, height, width, generator, latents, sched)
        latents = self.denoise(
            latents, text, sched, num_inference_steps, guidance_scale, progress, generator
        )
        frames = self.decode(latents, decode_chunk_size)
        info = dict(
            prompt=prompts,
            negative_prompt=negatives,
            num_frames=num_frames,
            height=height,
            width=width,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            seed=seed,
            scheduler=scheduler or self.scheduler_name,
            num_videos_per_prompt=num_videos_per_prompt,
            dtype=str(self.dtype).removeprefix("torch."),
            motion_loras={n: lora.strength for n, lora in self.motion_loras.items()},
        )
        return Video(frames, fps=fps, info=info)

    def denoise(
        self,
        latents,
        text,
        scheduler,
        steps: int,
        guidance_scale: float,
        progress: bool,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """The sampling loop; `generator` (continuing the seed's stream) feeds stochastic
        samplers such as Euler ancestral, so seeded runs repeat exactly."""
        scheduler.set_timesteps(steps, device=self.device)
        guidance = guidance_scale > 1.0
        for t in tqdm(scheduler.timesteps, disable=not progress, desc="denoising"):
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.unet(model_input.to(self.dtype), t, text).float()
            if guidance:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
        return latents

    def decode(self, latents: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
        """(b, 4, f, h, w) latents -> (b, 3, f, H, W) float32 frames in [0, 1], on the CPU."""
        b, c, f, h, w = latents.shape
        flat = (latents / self.vae.config.scaling_factor).transpose(1, 2).reshape(b * f, c, h, w)
        flat = flat.to(self.vae.dtype)
        pixels = [self.vae.decode(chunk).sample.float().cpu() for chunk in flat.split(chunk_size)]
        video = torch.cat(pixels)
        video = video.view(b, f, *video.shape[1:]).transpose(1, 2)
        return (video / 2 + 0.5).clamp(0, 1)
