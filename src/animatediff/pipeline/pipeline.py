"""`AnimationPipeline`: text -> video with a motion module inserted into an SD1.5 model.

The sampling loop is the official AnimateDiff one: noise drawn once in the layout
(b, 4, f, h/8, w/8), classifier-free guidance with the unconditional and conditional batches
run together, the scheduler stepping all frames jointly, then the VAE decoding frame by frame.
"""

from __future__ import annotations

import contextlib
import dataclasses
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..checkpoints.adapters import apply_image_lora, attention_lora_pairs
from ..checkpoints.base import ImageModel, load_base, load_single_file, load_vae_file
from ..checkpoints.motion import load_motion_module
from ..control import (
    ControlNetInput,
    SparseCtrlInput,
    load_controlnet,
    load_sparsectrl,
    sparse_condition,
    total_residuals,
)
from ..lora import LoRASet, merge_lora
from ..motion.module import MotionModules
from ..motion.unet import MotionUNet
from ..vae import decode_latents, encode_frames
from ..video import Video
from .context import ContextOptions, WindowAccumulator, context_windows, window_text
from .inputs import FramesLike, as_frames, as_image
from .noise import (
    FREEINIT_DEFAULTS,
    freeinit_reinit,
    freenoise_latents,
    freq_filter,
    mix_shared_noise,
)
from .prompt import encode_prompts
from .schedulers import make_scheduler
from .travel import compose_prompt, frame_embeddings, travel_prompts

LATENT_CHANNELS = 4
Prompt = str | Sequence[str] | Mapping[int | str, str]


@dataclass(frozen=True)
class Sampling:
    """How one generation samples (what `denoise` and `predict` need)."""

    scheduler: object
    steps: int
    guidance_scale: float
    context: ContextOptions | None
    views: bool
    progress: bool
    generator: torch.Generator | None
    controls: tuple = ()  # SparseCtrlInput / ControlNetInput, their residuals summed
    start_step: int = 0  # > 0 when denoising an init image or video from a strength
    callback: Callable[[int, int], None] | None = None  # (steps done, total); raise to stop


def _jsonable(value):
    """Settings as they go into the saved JSON: prompts as a list (or a map), numbers as is."""
    if isinstance(value, Mapping):
        return {str(k): v for k, v in value.items()}
    if isinstance(value, str):
        return [value]
    return value if isinstance(value, (int, float)) else list(value)


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
        self.sparsectrl = None
        self.controlnets: list = []
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
        sparsectrl: str | Path | None = None,
        controlnets: Sequence[str | Path] | str | Path | None = None,
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
        the v3 domain adapter, merged. sparsectrl: a SparseCtrl encoder file (RGB or scribble).
        controlnets: SD1.5 ControlNets (diffusers folders, hub ids or single files).
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
        if sparsectrl is not None:
            pipe.sparsectrl = load_sparsectrl(sparsectrl, image.unet)
            pipe.sources["sparsectrl"] = str(sparsectrl)
        if controlnets is not None:
            paths = [controlnets] if isinstance(controlnets, (str, Path)) else list(controlnets)
            pipe.controlnets = [load_controlnet(p, image.unet) for p in paths]
            pipe.sources["controlnets"] = [str(p) for p in paths]
        return pipe.to(device, dtype)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move; `dtype` applies to UNet, motion modules and text encoder. In fp16 the VAE stays
        fp32: SD1.5's VAE overflows in fp16."""
        vae_dtype = torch.float32 if dtype == torch.float16 else dtype
        modules = [(self.text_encoder, dtype), (self.unet, dtype), (self.vae, vae_dtype)]
        modules += [(m, dtype) for m in [self.sparsectrl, *self.controlnets] if m is not None]
        for module, dt in modules:
            current = next(module.parameters()).dtype
            module.to(device) if dt is None or dt == current else module.to(device, dt)
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
    def embed(self, prompt: Prompt, num_frames: int, head: str, tail: str, method: str):
        """(P, 77, d) for a prompt or list of prompts; (num_frames, 77, d) for a prompt map
        (prompt travel: keyframes encoded, frames in between interpolated)."""
        if not isinstance(prompt, Mapping):
            texts = [compose_prompt(head, p, tail) for p in _as_list(prompt)]
            return encode_prompts(self.tokenizer, self.text_encoder, texts)
        keys = travel_prompts(prompt, num_frames, head, tail)
        embeddings = encode_prompts(self.tokenizer, self.text_encoder, [t for _, t in keys])
        return frame_embeddings(list(zip([f for f, _ in keys], embeddings)), num_frames, method)

    def conditioning(
        self,
        prompt: Prompt,
        negative: Prompt,
        num_frames: int,
        videos: int,
        guidance: bool,
        head: str = "",
        tail: str = "",
        method: str = "linear",
    ):
        """Text for the UNet: rows [uncond videos; cond videos], one per video, or one per
        frame of each video (`(2 b f, 77, d)`) when either prompt is a prompt map."""
        cond = self.embed(prompt, num_frames, head, tail, method)
        uncond = self.embed(negative, num_frames, "", "", method)
        travel = isinstance(prompt, Mapping) or isinstance(negative, Mapping)
        if travel:  # one row per frame, the same for every video
            cond, uncond = (
                t.expand(num_frames, *t.shape[1:]) if len(t) == 1 else t for t in (cond, uncond)
            )
            return torch.cat(
                [uncond.repeat(videos, 1, 1), cond.repeat(videos, 1, 1)]
                if guidance
                else [cond.repeat(videos, 1, 1)]
            )
        if len(uncond) == 1:
            uncond = uncond.expand(len(cond), *uncond.shape[1:])
        if len(uncond) != len(cond):
            raise ValueError(f"{len(uncond)} negative prompts for {len(cond)} prompts")
        text = torch.cat([uncond, cond]) if guidance else cond
        return text.repeat_interleave(videos, dim=0)

    def generator(self, seed: int | None) -> torch.Generator | None:
        """The official code seeds the generator of the device that draws the noise (the CPU
        for mps): same seed and device, same noise."""
        if seed is None:
            return None
        return torch.Generator("cpu" if self.device.type == "mps" else self.device).manual_seed(
            seed
        )

    def initial_noise(
        self,
        batch: int,
        num_frames: int,
        height: int,
        width: int,
        generator: torch.Generator | None,
        latents: torch.Tensor | None,
    ):
        factor = self.vae_scale_factor
        shape = (batch, LATENT_CHANNELS, num_frames, height // factor, width // factor)
        if latents is None:  # drawn at once, in the official layout
            latents = torch.randn(shape, generator=generator, device=generator.device)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(self.device, torch.float32)

    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompt,
        negative_prompt: Prompt | None = None,
        num_frames: int | None = None,
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
        context_length: int | None = 16,
        context_overlap: int = 4,
        context_stride: int = 1,
        context_schedule: str = "static",
        context_fuse: str = "pyramid",
        context_views: bool = False,
        prompt_head: str = "",
        prompt_tail: str = "",
        prompt_interpolation: str = "linear",
        freenoise: bool = False,
        shared_noise: float | None = None,
        freeinit_iterations: int = 0,
        freeinit_filter: str = "butterworth",
        motion_scale: float | Sequence[float] = 1.0,
        control_images: FramesLike | None = None,
        control_frames: Sequence[int] | None = None,
        control_scale: float = 1.0,
        control_sample: bool = False,
        controlnet_images: FramesLike | Sequence[FramesLike] | None = None,
        controlnet_scale: float | Sequence[float] = 1.0,
        controlnet_start: float | Sequence[float] = 0.0,
        controlnet_end: float | Sequence[float] = 1.0,
        init_image: FramesLike | None = None,
        init_video: FramesLike | None = None,
        strength: float = 0.8,
        output_type: str = "video",
        callback: Callable[[int, int], None] | None = None,
    ) -> Video | torch.Tensor:
        """Generate `len(prompt) * num_videos_per_prompt` videos of `num_frames` frames.

        prompt: a string, a list (one video each), or a prompt map `{frame: prompt}` (prompt
        travel; `-1` is the last frame; `prompt_head`/`prompt_tail` are added to every key).
        height/width default to the model's native size (512 for SD1.5). `latents`
        (b, 4, f, h/8, w/8) replace the seeded noise. Clips longer than `context_length` are
        denoised in overlapping windows (`context_*`; `None` samples all frames at once;
        `context_views` windows only the motion modules). `shared_noise` (default: the motion
        module's own, 0 for released modules) mixes a noise frame common to all frames into each
        frame's noise, as the module was trained. `freenoise` reschedules the noise
        of later windows; `freeinit_iterations` > 0 enables FreeInit; `motion_scale` scales the
        motion modules' effect (a number, or one per frame).

        Control (images: a tensor (b, 3, k, H, W) or (3, k, H, W) in [0, 1], PIL images, a
        `Video` or a path): SparseCtrl keyframes `control_images` at `control_frames` with
        `control_scale` (RGB keyframes VAE-encoded, posterior mean unless `control_sample`);
        for each loaded ControlNet, `controlnet_images` (one frame per video frame) with its
        `controlnet_scale`/`_start`/`_end` (a number for all, or one each). `init_image`
        (img2vid) or `init_video` (vid2vid; `num_frames` defaults to its length) is encoded and
        noised to `strength` (0 keeps it, 1 ignores it). `output_type="latents"` returns the
        denoised latents (b, 4, f, h/8, w/8) instead of decoding them. `callback(done, total)`
        is called after every denoising step (FreeInit: every step of every pass); an exception
        raised in it stops the generation.
        """
        if output_type not in ("video", "latents"):
            raise ValueError(f"output_type must be 'video' or 'latents', not {output_type!r}")
        height = height or self.default_size
        width = width or self.default_size
        if height % 8 or width % 8:
            raise ValueError(f"height and width must be multiples of 8, got {height}x{width}")
        if init_image is not None and init_video is not None:
            raise ValueError("give init_image or init_video, not both")
        init_frames = None
        if init_image is not None or init_video is not None:
            init_frames = (
                as_image(init_image, height, width, "init_image")
                if init_video is None
                else as_frames(init_video, height, width, "init_video")
            )
        if num_frames is None:
            num_frames = init_frames.shape[2] if init_video is not None else 16
        travel = isinstance(prompt, Mapping)
        videos = num_videos_per_prompt * (1 if travel else len(_as_list(prompt)))
        seed = secrets.randbelow(2**31) if seed is None and latents is None else seed
        sched = make_scheduler(scheduler) if scheduler else self.scheduler
        guidance = guidance_scale > 1.0
        negative = negative_prompt if negative_prompt is not None else ""
        text = self.conditioning(
            prompt,
            negative,
            num_frames,
            num_videos_per_prompt,
            guidance,
            prompt_head,
            prompt_tail,
            prompt_interpolation,
        ).to(self.dtype)
        context = (
            ContextOptions(
                context_length, context_overlap, context_stride, context_schedule, context_fuse
            )
            if context_length and num_frames > context_length
            else None
        )
        generator = self.generator(seed)
        noise = self.initial_noise(videos, num_frames, height, width, generator, latents)
        if shared_noise is None:
            shared_noise = self.unet.config.shared_noise
        if latents is None:
            noise = mix_shared_noise(noise, shared_noise, generator)
        if freenoise and context is not None:
            noise = freenoise_latents(noise, context_length, context_overlap, generator)
        controls = self._sparsectrl_inputs(
            control_images,
            control_frames,
            control_scale,
            control_sample,
            num_frames,
            height,
            width,
            generator,
        ) + self._controlnet_inputs(
            controlnet_images,
            controlnet_scale,
            controlnet_start,
            controlnet_end,
            num_frames,
            height,
            width,
        )
        start_step = 0
        if init_frames is not None:
            if freeinit_iterations:
                raise ValueError(
                    "FreeInit re-draws the initial noise; not with an init image/video"
                )
            start_step = self.start_step(num_inference_steps, strength)
        sampling = Sampling(
            sched,
            num_inference_steps,
            guidance_scale,
            context,
            context_views,
            progress,
            generator,
            tuple(controls),
            start_step,
            callback,
        )
        with self.motion_scale(motion_scale):
            if init_frames is None:
                latents = self.sample_with_freeinit(
                    noise, text, sampling, freeinit_iterations, freeinit_filter
                )
            else:
                init = self.init_latents(init_frames, videos, num_frames, decode_chunk_size)
                latents = self.denoise(self.noised(init, noise, sampling), text, sampling)
        if output_type == "latents":
            return latents
        frames = self.decode(latents, decode_chunk_size)
        info = dict(
            prompt=_jsonable(prompt),
            negative_prompt=_jsonable(negative),
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
            context=None
            if context is None
            else {**dataclasses.asdict(context), "views": context_views},
            freenoise=freenoise,
            shared_noise=shared_noise,
            freeinit_iterations=freeinit_iterations,
            motion_scale=_jsonable(motion_scale),
            control_frames=None if control_images is None else list(control_frames),
            control_scale=None if control_images is None else control_scale,
            strength=None if init_frames is None else strength,
        )
        return Video(frames, fps=fps, info=info)

    # -- control and init ----------------------------------------------------------------------
    def _latent_size(self, height: int, width: int) -> tuple[int, int]:
        return height // self.vae_scale_factor, width // self.vae_scale_factor

    def _sparsectrl_inputs(
        self, images, frames, scale, sample, num_frames, height, width, generator
    ) -> list[SparseCtrlInput]:
        if images is None:
            return []
        if self.sparsectrl is None:
            raise ValueError("control_images need a SparseCtrl encoder: load(..., sparsectrl=PATH)")
        images = as_frames(images, height, width, "control_images")
        frames = list(range(images.shape[2])) if frames is None else list(frames)
        condition = sparse_condition(
            self.sparsectrl,
            images.to(self.device),
            frames,
            num_frames,
            self.vae,
            self._latent_size(height, width),
            sample_posterior=sample,
            generator=generator,
        )
        return [SparseCtrlInput(self.sparsectrl, condition, scale)]

    def _controlnet_inputs(
        self, images, scales, starts, ends, num_frames, height, width
    ) -> list[ControlNetInput]:
        if images is None:
            return []
        n = len(self.controlnets)
        if n == 0:
            raise ValueError("controlnet_images need ControlNets: load(..., controlnets=[...])")
        # One entry per ControlNet; with a single ControlNet its frames may be given directly.
        one_each = n > 1 or (isinstance(images, list) and len(images) == 1)
        per_net = list(images) if one_each else [images]
        if len(per_net) != n:
            raise ValueError(f"{len(per_net)} controlnet_images for {n} ControlNets")

        def each(value, name):
            values = [value] * n if isinstance(value, (int, float)) else list(value)
            if len(values) != n:
                raise ValueError(f"{len(values)} values of {name} for {n} ControlNets")
            return values

        inputs = []
        for model, frames, scale, start, end in zip(
            self.controlnets,
            per_net,
            each(scales, "controlnet_scale"),
            each(starts, "controlnet_start"),
            each(ends, "controlnet_end"),
        ):
            frames = as_frames(frames, height, width, "controlnet_images")
            if frames.shape[2] < num_frames:
                raise ValueError(
                    f"controlnet_images has {frames.shape[2]} frames for {num_frames} video frames"
                )
            inputs.append(
                ControlNetInput(model, frames[:, :, :num_frames].to(self.device), scale, start, end)
            )
        return inputs

    @staticmethod
    def start_step(num_steps: int, strength: float) -> int:
        """The first step when denoising from an init noised to `strength` (diffusers' rule:
        the last `int(num_steps * strength)` steps run)."""
        if not 0 <= strength <= 1:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        return num_steps - min(int(num_steps * strength), num_steps)

    def init_latents(self, frames: torch.Tensor, videos: int, num_frames: int, chunk: int):
        """Init image (one frame, repeated) or video (its first `num_frames`) -> latents."""
        if frames.shape[2] not in (1, num_frames) and frames.shape[2] < num_frames:
            raise ValueError(f"init video has {frames.shape[2]} frames, fewer than {num_frames}")
        if frames.shape[0] not in (1, videos):
            raise ValueError(f"{frames.shape[0]} init videos for {videos} generated videos")
        latents = encode_frames(
            self.vae, frames[:, :, :num_frames].to(self.device), chunk_size=chunk
        )
        latents = latents.expand(videos, -1, num_frames, -1, -1)
        return latents.to(self.device, torch.float32).contiguous()

    def noised(self, init: torch.Tensor, noise: torch.Tensor, sampling: Sampling) -> torch.Tensor:
        """The init latents diffused to the first timestep that will run; pure noise at
        strength 1 (the input is ignored), the init itself at strength 0 (nothing runs)."""
        scheduler = sampling.scheduler
        if sampling.start_step == 0:
            return noise * scheduler.init_noise_sigma
        if sampling.start_step >= sampling.steps:
            return init
        self._set_timesteps(sampling)
        t = scheduler.timesteps[sampling.start_step : sampling.start_step + 1]
        return scheduler.add_noise(init, noise, t.repeat(init.shape[0]))

    def _set_timesteps(self, sampling: Sampling) -> None:
        sampling.scheduler.set_timesteps(sampling.steps, device=self.device)
        if sampling.start_step and hasattr(sampling.scheduler, "set_begin_index"):
            sampling.scheduler.set_begin_index(sampling.start_step)

    @contextlib.contextmanager
    def motion_scale(self, scale: float | Sequence[float]) -> Iterator[None]:
        """Scale the motion modules' effect inside a `with` block (0 turns them off: frames
        are denoised one by one; a sequence gives one scale per frame); restored on exit."""
        previous = self.unet.motion_scale
        self.unet.motion_scale = (
            float(scale)
            if isinstance(scale, (int, float))
            else torch.tensor(list(scale), dtype=torch.float32)
        )
        try:
            yield
        finally:
            self.unet.motion_scale = previous

    def sample_with_freeinit(self, noise, text, sampling: Sampling, iterations: int, kind: str):
        """FreeInit: after each full sampling, diffuse the result back to the last timestep
        with the initial noise, keep its low frequencies and take fresh high-frequency noise."""
        latents = self.denoise(noise * sampling.scheduler.init_noise_sigma, text, sampling)
        if iterations <= 0:
            return latents
        lpf = freq_filter(
            noise.shape[-3:],
            kind=kind,
            device=noise.device,
            **{k: v for k, v in FREEINIT_DEFAULTS.items() if k in ("n", "d_s", "d_t")},
        )
        last = torch.full(
            (noise.shape[0],),
            sampling.scheduler.config.num_train_timesteps - 1,
            device=noise.device,
            dtype=torch.long,
        )
        for _ in range(iterations):
            diffused = sampling.scheduler.add_noise(latents, noise, last)
            fresh = torch.randn(
                noise.shape,
                generator=sampling.generator,
                device=sampling.generator.device if sampling.generator else None,
            )
            restart = freeinit_reinit(diffused, fresh.to(noise.device), lpf)
            latents = self.denoise(restart * sampling.scheduler.init_noise_sigma, text, sampling)
        return latents

    def denoise(
        self, latents: torch.Tensor, text: torch.Tensor, sampling: Sampling
    ) -> torch.Tensor:
        """The sampling loop; the generator (continuing the seed's stream) feeds stochastic
        samplers such as Euler ancestral, so seeded runs repeat exactly."""
        scheduler = sampling.scheduler
        self._set_timesteps(sampling)
        guidance = sampling.guidance_scale > 1.0
        timesteps = scheduler.timesteps
        steps = range(sampling.start_step, len(timesteps))
        for step in tqdm(steps, disable=not sampling.progress, desc="denoising"):
            t = timesteps[step]
            model_input = torch.cat([latents] * 2) if guidance else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.predict(model_input, t, text, sampling, step, len(timesteps))
            if guidance:
                uncond, cond = noise.chunk(2)
                noise = uncond + sampling.guidance_scale * (cond - uncond)
            latents = scheduler.step(noise, t, latents, generator=sampling.generator).prev_sample
            if sampling.callback is not None:
                sampling.callback(step + 1 - sampling.start_step, len(steps))
        return latents

    def predict(self, sample, t, text, sampling: Sampling, step: int, num_steps: int):
        """The UNet's prediction for all frames: at once, or window by window fused per frame
        with the context options' weights (before guidance)."""
        frames = sample.shape[2]
        context = sampling.context
        windows = context_windows(frames, step, num_steps, context) if context else None
        everything = list(range(frames))

        def run(x, text, indices, views=None):
            """The UNet plus every control's residuals, on the video's frames `indices`."""
            x = x.to(self.dtype)
            res = total_residuals(sampling.controls, x, t, text, indices, step, num_steps, views)
            return self.unet(x, t, text, **(res.unet_kwargs(self.dtype) if res else {})).float()

        if windows is None or len(windows) == 1 and windows[0] == everything:
            return run(sample, text, everything)
        if sampling.views:  # image layers see every frame; only the motion modules are windowed
            views = [(w, context.weights(len(w))) for w in windows]
            with self.unet.frame_windows(views):
                return run(sample, text, everything, views)
        fused = WindowAccumulator.like(sample)
        scale = self.unet.motion_scale
        try:
            for window in windows:
                if isinstance(scale, torch.Tensor):  # a per-frame scale follows its frames
                    self.unet.motion_scale = scale[window]
                sub_text = window_text(text, window, sample.shape[0], frames)
                out = run(sample[:, :, window], sub_text, window)
                fused.add(window, out, context.weights(len(window), device=sample.device))
        finally:
            self.unet.motion_scale = scale
        return fused.result()

    def decode(self, latents: torch.Tensor, chunk_size: int = 16) -> torch.Tensor:
        """(b, 4, f, h, w) latents -> (b, 3, f, H, W) float32 frames in [0, 1], on the CPU."""
        return decode_latents(self.vae, latents, chunk_size)
