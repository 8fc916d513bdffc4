"""`AnimationPipeline`: text -> video with a motion module inserted into an SD1.5 model.

The sampling loop is the official AnimateDiff one: noise drawn once in the layout
(b, 4, f, h/8, w/8), classifier-free guidance with the unconditional and conditional batches
run together, the scheduler stepping all frames jointly, then the VAE decoding frame by frame.
Options come as frozen dataclasses by concern (`animatediff.options`), or as flat keywords.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import secrets
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..builtin import named_motion_module
from ..builtin.model import resolve as resolve_builtin
from ..checkpoints.adapters import apply_image_lora, attention_lora_pairs
from ..checkpoints.base import ImageModel, load_base, load_single_file, load_vae_file
from ..checkpoints.embeddings import TextualInversions
from ..checkpoints.hub import resolve
from ..checkpoints.io import load_state_dict
from ..checkpoints.motion import build_motion_module, read_motion_checkpoint
from ..control import (
    SparseControlNet,
    active,
    controlnet_inputs,
    load_controlnet,
    load_sparsectrl,
    sparsectrl_input,
    total_residuals,
)
from ..control.ip_adapter import IPAdapter, IPAdapterEmbeds, load_ip_adapter
from ..errors import NonFiniteResult
from ..lora import LoRASet, merge_lora
from ..lora import merged as lora_merged
from ..motion.frames import WindowAccumulator, select_frames, window_text
from ..motion.module import MotionModules
from ..motion.unet import MotionUNet, as_motion_scale, set_ff_chunking
from ..options import ContextOptions, OptionError, Options, SamplingOptions, as_list
from ..vae import decode_latents, encode_frames
from ..video import Video
from ..video.inputs import as_frames, as_image, reference_images
from . import speed
from .context import context_windows, fuse_weights
from .noise import (
    FREEINIT_DEFAULTS,
    freeinit_reinit,
    freenoise_latents,
    freq_filter,
    mix_shared_noise,
)
from .offload import Offload
from .presets import preset_settings
from .prompt import encode_prompts
from .schedulers import make_scheduler
from .travel import compose_prompt, frame_embeddings, travel_prompts

LATENT_CHANNELS = 4
Prompt = str | Sequence[str] | Mapping[int | str, str]


@dataclass(frozen=True)
class Plan:
    """Everything one generation's sampling loop needs, resolved from the options."""

    options: Options  # with sizes, frames, seed, scheduler and shared noise filled in
    scheduler: object
    text: torch.Tensor  # rows [uncond videos; cond videos] (or cond only), per video or frame
    noise: torch.Tensor  # (b, 4, f, h, w) initial noise, float32
    generator: torch.Generator | None
    controls: tuple = ()  # SparseCtrlInput / ControlNetInput, their residuals summed
    init: torch.Tensor | None = None  # init latents (img2vid / vid2vid)
    start_step: int = 0  # > 0 when denoising an init from a strength
    image_embeds: IPAdapterEmbeds | None = None  # IP-Adapter reference images, encoded
    progress: bool = True
    callback: Callable[[int, int], None] | None = None  # (steps done, total); raise to stop

    @property
    def steps(self) -> int:
        return self.options.sampling.num_inference_steps

    @property
    def guided(self) -> bool:
        return self.options.sampling.guidance_scale > 1.0

    @property
    def context(self) -> ContextOptions | None:
        ctx = self.options.context
        return ctx if ctx.applies(self.noise.shape[2]) else None

    def guided_at(self, step: int) -> bool:
        """Whether step `step` runs the unconditional pass (guidance on a subset of steps)."""
        p = self.options.performance
        return self.guided and active(step, self.steps, p.guidance_start, p.guidance_end)


@dataclass
class Loop:
    """What a denoising pass needs on the device, made before its first step so that no step
    waits for the device: the timesteps, the motion scale, fusion weights, the IP-Adapter's
    rows per window; and DeepCache's features, by window."""

    timesteps: torch.Tensor  # on the device, for the UNet
    scale: float | torch.Tensor  # 1.0 (exact fast path) or a device tensor (no recompiling)
    device: torch.device
    weights: dict = dataclasses.field(default_factory=dict)
    embeds: dict = dataclasses.field(default_factory=dict)
    features: dict = dataclasses.field(default_factory=dict)

    @classmethod
    def prepare(cls, timesteps: torch.Tensor, scale, device: torch.device) -> Loop:
        if not (isinstance(scale, float) and scale == 1.0):
            scale = torch.as_tensor(scale, dtype=torch.float32).to(device)
        return cls(timesteps.to(device), scale, device)

    def scale_for(self, frames: list[int]) -> float | torch.Tensor:
        if isinstance(self.scale, torch.Tensor) and self.scale.ndim == 1:
            return select_frames(self.scale, frames, 0)
        return self.scale

    def fuse(self, context: ContextOptions, length: int) -> torch.Tensor:
        if length not in self.weights:
            self.weights[length] = fuse_weights(
                length, context.context_fuse, context.context_overlap, device=self.device
            )
        return self.weights[length]

    def image_embeds(self, embeds: IPAdapterEmbeds, frames, batch: int, guided: bool) -> list:
        """The IP-Adapter's rows for these frames of a batch of `batch` videos (doubled by
        guidance), made once per pass."""
        key = (tuple(frames), batch, guided)
        if key not in self.embeds:
            self.embeds[key] = embeds.for_frames(frames, batch // (2 if guided else 1), guided)
        return self.embeds[key]


def load_image_model(base, personal, vae, loras, lora_scaling: str, adapter) -> ImageModel:
    """The image model: a base, optionally replaced by a single-file personal model and a VAE
    file, with image LoRAs and the domain adapter merged into its weights."""
    image = load_base(resolve(base, "base"), dtype=torch.float32)
    if personal is not None:
        load_single_file(image, resolve(personal, "personal"))
    if vae is not None:
        load_vae_file(image, resolve(vae, "vae"))
    for path, strength in _strength_pairs(loras):
        apply_image_lora(image, resolve(path, "lora"), strength, lora_scaling)
    if adapter is not None:
        ((path, scale),) = _strength_pairs(adapter)
        pairs = attention_lora_pairs(image.unet, resolve(path, "adapter"), "domain adapter")
        merge_lora(image.unet, pairs, scale)
    return image


def _motion_module(motion_module, version: str | None):
    """(MotionModules, recognised release or None) from a module object or any file."""
    if isinstance(motion_module, MotionModules):
        return motion_module, None
    ckpt = read_motion_checkpoint(resolve(motion_module, "motion_module"), version)
    return build_motion_module(ckpt), ckpt.release


def _image_encoder(ip_file: Path, image_encoder: str | Path | None) -> Path:
    """The IP-Adapter's CLIP image encoder: as given; else `image_encoder/` beside the adapter
    (as in the released repository); else the released SD1.5 encoder (ViT-H, which every
    released SD1.5 adapter uses), by name: a hub download lands the adapter alone."""
    if image_encoder is not None:
        return resolve(image_encoder, "image_encoder")
    beside = ip_file.parent / "image_encoder"
    if beside.is_dir():
        return beside
    load_state_dict(ip_file)  # a bad adapter file is said before anything is downloaded
    return resolve("ip-adapter-image-encoder", "image_encoder")


def _strength_pairs(items) -> list[tuple[str, float]]:
    """Accept `path`, `(path, strength)` or a list of either."""
    if items is None:
        return []
    if isinstance(items, str | Path) or (
        isinstance(items, tuple) and len(items) == 2 and isinstance(items[1], int | float)
    ):
        items = [items]
    return [(str(i), 1.0) if isinstance(i, str | Path) else (str(i[0]), float(i[1])) for i in items]


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
        self.ip_adapter: IPAdapter | None = None
        self.embeddings = TextualInversions(self.text_encoder.config.hidden_size)
        self.motion_release = None  # a recognised few-step release (Lightning, AnimateLCM)
        self.offload = Offload("none", "cpu", {})
        self.cuda_graphs = False  # set by optimize()

    @property
    def _offload_groups(self) -> dict[str, list]:
        controls = [self.sparsectrl, *self.controlnets]
        return {
            "text": [self.text_encoder, self.ip_adapter],
            "vae": [self.vae],
            "unet": [self.unet, *controls, *self.motion_loras.values(), self.ip_adapter],
        }

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
        ip_adapter: str | Path | None = None,
        image_encoder: str | Path | None = None,
        embeddings: Sequence[str | Path] = (),
        scheduler: str = "ddim",
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
        offload: str = "none",
        compile: str = "none",
        cuda_graphs: bool = False,
        fuse_qkv: bool = False,
        channels_last: bool = False,
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
        ip_adapter: an SD1.5 IP-Adapter file, with its CLIP `image_encoder` folder (default:
        `image_encoder/` beside the file, where the released ones sit). embeddings:
        textual-inversion files, each used in prompts by its file name. Every file argument may
        also be a Hub id, `repo:file` or an alias (`checkpoints.hub`), downloaded once.
        offload: "model" or "sequential" keeps weights in RAM (see :meth:`enable_offload`);
        compile, cuda_graphs, fuse_qkv, channels_last: lossless speed-ups (:meth:`optimize`).
        A built-in few-step motion module is taken by name (`motion_module="builtin-4step"`,
        `animatediff models`), with its image-layer LoRA as the adapter when it has one.
        """
        try:
            motion_module, adapter = named_motion_module(motion_module, adapter)
        except ValueError as e:
            raise OptionError(str(e)) from None
        base, motion_module = resolve_builtin(base, motion_module)
        if motion_module is None:
            raise OptionError("a motion module is needed with a custom base (motion_module=...)")
        motion, release = _motion_module(motion_module, motion_version)  # small: read first
        image = load_image_model(base, personal, vae, loras, lora_scaling, adapter)
        pipe = cls(image, MotionUNet(image.unet, motion), scheduler=scheduler)
        pipe.motion_release = release
        for path in embeddings:
            pipe.embeddings.load(resolve(path, "embedding"))
        for path, strength in _strength_pairs(motion_loras):
            pipe.add_motion_lora(resolve(path, "motion_lora"), strength)
        pipe._load_conditioners(sparsectrl, controlnets, ip_adapter, image_encoder)
        pipe.to(device, dtype)
        pipe.optimize(
            compile, cuda_graphs=cuda_graphs, fuse_qkv=fuse_qkv, channels_last=channels_last
        )
        if offload != "none":
            pipe.enable_offload(offload, device)
        return pipe

    def _load_conditioners(self, sparsectrl, controlnets, ip_adapter, image_encoder) -> None:
        """The SparseCtrl encoder, ControlNets and IP-Adapter named to `load` (see there)."""
        unet = self.unet.unet
        if sparsectrl is not None:
            self.sparsectrl = load_sparsectrl(resolve(sparsectrl, "sparsectrl"), unet)
        if controlnets is not None:
            paths = [controlnets] if isinstance(controlnets, str | Path) else list(controlnets)
            self.controlnets = [load_controlnet(resolve(p, "controlnet"), unet) for p in paths]
        if ip_adapter is not None:
            ip_file = resolve(ip_adapter, "ip_adapter")
            encoder = _image_encoder(ip_file, image_encoder)
            self.ip_adapter = load_ip_adapter(ip_file, encoder, unet)

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None):
        """Move and cast every model (offloading ends). The VAE takes the same dtype: in fp16
        a chunk that overflows is decoded again in fp32 (`animatediff.vae`)."""
        if self.offload.mode == "sequential":
            raise ValueError("the UNet is streamed (offload sequential): load the pipeline again")
        if self.offload.mode != "none" and device is None:
            device = self.offload.device
        self.offload = Offload("none", "cpu", {})
        modules = [(self.text_encoder, dtype), (self.unet, dtype), (self.vae, dtype)]
        modules += [(m, dtype) for m in [self.sparsectrl, *self.controlnets] if m is not None]
        for module, dt in modules:
            current = next(module.parameters()).dtype
            module.to(device) if dt is None or dt == current else module.to(device, dt)
        for lora in self.motion_loras.values():
            lora.to(device=device)
        if self.ip_adapter is not None:
            self.ip_adapter.to(device, dtype)
        return self

    @property
    def default_size(self) -> int:
        return self.unet.unet.config.sample_size * self.vae_scale_factor

    @property
    def vae_scale_factor(self) -> int:
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        """Where generation runs (with offloading, where each model is moved to run)."""
        return self.offload.device if self.offload.mode != "none" else self.unet.device

    # -- memory and speed ----------------------------------------------------------------------
    def enable_offload(self, mode: str = "model", device: str | torch.device | None = None):
        """Keep weights in RAM and move each model to `device` (default: the current one) only
        for its phase: "model" (whole models: the text encoder, the VAE, the UNet with its
        motion modules and controls), "sequential" (the UNet streamed layer by layer through
        accelerate: least memory, slowest), "none" (everything back on the device)."""
        device = torch.device(device) if device is not None else self.device
        if mode == "none":
            return self.to(device)
        if mode == "sequential" and self.ip_adapter is not None:
            raise OptionError("offload sequential does not support an IP-Adapter; use model")
        if self.offload.mode == "sequential":
            raise ValueError("sequential offloading cannot be changed once enabled; load again")
        if mode == "sequential":
            self.unet.motion.fuse_projections(False)  # streamed weights cannot stay fused views
        self.offload = Offload(mode, device, self._offload_groups)
        return self

    def enable_model_cpu_offload(self, device: str | torch.device | None = None):
        """diffusers' name for `enable_offload("model", device)`."""
        return self.enable_offload("model", device)

    def enable_sequential_cpu_offload(self, device: str | torch.device | None = None):
        """diffusers' name for `enable_offload("sequential", device)`."""
        return self.enable_offload("sequential", device)

    def optimize(
        self,
        compile: str = "none",
        *,
        cuda_graphs: bool = False,
        fuse_qkv: bool = False,
        channels_last: bool = False,
    ) -> AnimationPipeline:
        """Lossless speed-ups (each gives the eager result within the dtype's rounding):
        `compile` "regional" (the repeated blocks) or "full" (one graph per UNet call),
        `cuda_graphs` (with "full" on CUDA), `fuse_qkv` (fused attention projections, spatial
        and temporal), `channels_last` (NHWC convolutions)."""
        if fuse_qkv:
            speed.fuse_projections(self.unet)
        if channels_last:
            speed.channels_last(self.unet)
        speed.compile_unet(self.unet, compile, cuda_graphs)
        self.cuda_graphs = cuda_graphs and compile == "full" and self.device.type == "cuda"
        return self

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
            raise OptionError(f"a MotionLoRA named {name!r} is already attached")
        lora.strength = strength
        self.motion_loras[name] = lora.to(self.device).attach(self.unet.motion)
        return name

    def remove_motion_lora(self, name: str) -> None:
        self.motion_loras.pop(name).detach()

    def set_motion_lora_strength(self, name: str, strength: float) -> None:
        self.motion_loras[name].strength = strength

    # -- generation ----------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: Prompt,
        negative_prompt: Prompt | None = None,
        *,
        options: Options | None = None,
        latents: torch.Tensor | None = None,
        progress: bool = True,
        output_type: str = "video",
        callback: Callable[[int, int], None] | None = None,
        **settings,
    ) -> Video | torch.Tensor:
        """Generate `len(prompt) * num_videos_per_prompt` videos.

        prompt: a string, a list (one video each), or a prompt map `{frame: prompt}` (prompt
        travel; `-1` is the last frame). Settings: an :class:`~animatediff.options.Options`,
        its groups (`sampling=SamplingOptions(...)`, `context=...`, `noise=...`, `prompting=...`,
        `control=...`, `init=...`, `output=...`, `performance=...`) or their fields as flat keywords
        (`num_frames=24`, `context_length=16`, `init_image="photo.png"`, ...); see
        `animatediff.options` for every option and its meaning. `latents` (b, 4, f, h/8, w/8)
        replace the seeded noise. `output_type="latents"` returns the denoised latents instead
        of decoding them. `callback(done, total)` is called after every denoising step (FreeInit:
        every step of every pass); an exception raised in it stops the generation.
        """
        if output_type not in ("video", "latents"):
            raise ValueError(f"output_type must be 'video' or 'latents', not {output_type!r}")
        negative = negative_prompt if negative_prompt is not None else ""
        plan = self.plan(prompt, negative, Options.build(settings, options), latents)
        plan = dataclasses.replace(plan, progress=progress, callback=callback)
        self.offload.activate("unet")
        with self.generating(plan):
            latents = self.sample(plan)
        # One check per generation, after the loop (a meta-device trace has no values).
        if latents.device.type != "meta" and not torch.isfinite(latents).all():
            raise NonFiniteResult(
                "the denoised latents are not finite (NaN or inf): a model file holds "
                "non-finite weights, or a strength or scale is too large; nothing was saved"
            )
        if output_type == "latents":
            return latents
        out = plan.options.output
        frames = self.decode(latents, out.decode_chunk_size, plan.options.performance.vae_tiling)
        return Video(frames, fps=plan.options.output.fps, info=self.info(prompt, negative, plan))

    def plan(
        self, prompt: Prompt, negative: Prompt, options: Options, latents: torch.Tensor | None
    ) -> Plan:
        """Resolve sizes, seed, sampler, text, noise, controls and init for one generation."""
        options = self.with_preset(options)
        s = options.sampling
        height, width = s.height or self.default_size, s.width or self.default_size
        init = self.init_frames(options, height, width)
        num_frames = s.num_frames or (init.shape[2] if options.init.init_video is not None else 16)
        prompts = 1 if isinstance(prompt, Mapping) else len(as_list(prompt))
        seed = secrets.randbelow(2**31) if s.seed is None and latents is None else s.seed
        shared = options.noise.shared_noise
        shared = self.unet.config.shared_noise if shared is None else shared
        options = dataclasses.replace(
            options,
            sampling=dataclasses.replace(
                s, num_frames=num_frames, height=height, width=width, seed=seed
            ),
            noise=dataclasses.replace(options.noise, shared_noise=shared),
        )
        videos = s.num_videos_per_prompt * prompts
        generator = self.generator(seed)
        noise = self.initial_noise(videos, options, generator, latents)
        self.offload.activate("text")
        text = self.text(prompt, negative, options, s.guidance_scale > 1.0)
        image_embeds = self.image_embeds(options)
        return Plan(
            options=options,
            scheduler=self.make_scheduler(s),
            text=text.to(self.device, self.dtype),
            noise=noise,
            generator=generator,
            controls=tuple(self.controls(options, generator)),
            init=None if init is None else self.init_latents(init, videos, options),
            start_step=0 if init is None else self.start_step(options),
            image_embeds=image_embeds,
        )

    def with_preset(self, options: Options) -> Options:
        """Steps, guidance and sampler: as given, else the preset's (for what was loaded), else
        the defaults (25 steps, guidance 7.5, the scheduler `load` was given: DDIM)."""
        s = options.sampling
        given = dict(
            scheduler=s.scheduler,
            scheduler_config=s.scheduler_config,
            num_inference_steps=s.num_inference_steps,
            guidance_scale=s.guidance_scale,
        )
        chosen = preset_settings(s.preset, self.motion_release, **given) if s.preset else given
        guidance = chosen.get("guidance_scale")
        resolved = dict(
            scheduler=chosen.get("scheduler") or self.scheduler_name,
            scheduler_config=chosen.get("scheduler_config") or None,
            num_inference_steps=chosen.get("num_inference_steps") or 25,
            guidance_scale=7.5 if guidance is None else guidance,
        )
        return dataclasses.replace(options, sampling=dataclasses.replace(s, **resolved))

    def make_scheduler(self, s: SamplingOptions):
        """The sampler for these sampling options (the loaded one, unless they differ)."""
        if s.scheduler == self.scheduler_name and not s.scheduler_config:
            return self.scheduler
        try:
            return make_scheduler(s.scheduler, **(s.scheduler_config or {}))
        except ValueError as e:
            raise OptionError(f"scheduler_config: {e}") from None

    def info(self, prompt: Prompt, negative: Prompt, plan: Plan) -> dict:
        """How the video was made, for reproducing it (the settings JSON's core)."""
        return dict(
            prompt=_prompt_json(prompt),
            negative_prompt=_prompt_json(negative),
            **plan.options.to_json(),
            seeds=self.seeds(plan.options.sampling.seed, plan.noise.shape[0]),
            motion_loras={n: lora.strength for n, lora in self.motion_loras.items()},
            dtype=str(self.dtype).removeprefix("torch."),
        )

    # -- text ------------------------------------------------------------------------------------
    def text(self, prompt: Prompt, negative: Prompt, options: Options, guided: bool):
        """Text for the UNet: rows [uncond videos; cond videos], one per video, or one per
        frame of each video (`(2 b f, n, d)`) when either prompt is a prompt map."""
        num_frames = options.sampling.num_frames
        videos = options.sampling.num_videos_per_prompt
        p = options.prompting
        cond_keys = _prompt_keys(prompt, num_frames, p.prompt_head, p.prompt_tail)
        neg_keys = _prompt_keys(negative, num_frames, "", "") if guided else []
        # one encoding call, so that every text has the same token length
        encoded = self.encode([t for _, t in cond_keys + neg_keys], p.clip_skip)
        cond = _embeddings(cond_keys, encoded[: len(cond_keys)], num_frames, p.prompt_interpolation)
        if not guided:
            return _rows(cond, num_frames, videos, isinstance(prompt, Mapping))
        uncond = _embeddings(
            neg_keys, encoded[len(cond_keys) :], num_frames, p.prompt_interpolation
        )
        travel = isinstance(prompt, Mapping) or isinstance(negative, Mapping)
        if travel:  # one row per frame, the same for every video
            cond, uncond = (
                t.expand(num_frames, *t.shape[1:]) if len(t) == 1 else t for t in (cond, uncond)
            )
        elif len(uncond) == 1:
            uncond = uncond.expand(len(cond), *uncond.shape[1:])
        elif len(uncond) != len(cond):
            raise OptionError(f"{len(uncond)} negative prompts for {len(cond)} prompts")
        return torch.cat(
            [_rows(uncond, num_frames, videos, travel), _rows(cond, num_frames, videos, travel)]
        )

    def encode(self, texts: list[str], clip_skip: int = 1) -> torch.Tensor:
        """(len(texts), 77 k, d) text-encoder states, all texts padded to the same k chunks of
        75 tokens (A1111's `(word:1.2)` weights, BREAK, textual inversions by name)."""
        return encode_prompts(
            self.tokenizer,
            self.text_encoder,
            texts,
            clip_skip=clip_skip,
            embeddings=self.embeddings,
        )

    # -- noise -----------------------------------------------------------------------------------
    def generator(self, seed: int | None) -> torch.Generator | None:
        """The official code seeds the generator of the device that draws the noise (the CPU
        for mps): same seed and device, same noise."""
        if seed is None:
            return None
        device = "cpu" if self.device.type == "mps" else self.device
        return torch.Generator(device).manual_seed(seed)

    @staticmethod
    def seeds(seed: int | None, videos: int) -> list[int] | None:
        """Video i of a batch is drawn from seed + i (so any one can be remade alone)."""
        return None if seed is None else [seed + i for i in range(videos)]

    def initial_noise(
        self,
        videos: int,
        options: Options,
        generator: torch.Generator | None,
        latents: torch.Tensor | None,
    ) -> torch.Tensor:
        """(videos, 4, f, h, w) float32: given latents, or each video's noise drawn at once in
        the official layout from its own seed; then the frame-shared part and FreeNoise."""
        s, factor = options.sampling, self.vae_scale_factor
        shape = (videos, LATENT_CHANNELS, s.num_frames, s.height // factor, s.width // factor)
        if latents is not None:
            if tuple(latents.shape) != shape:
                raise OptionError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
            return latents.to(self.device, torch.float32)
        draws = []
        for i, seed in enumerate(self.seeds(s.seed, videos)):
            gen = generator if i == 0 else self.generator(seed)
            draws.append(self.video_noise(shape[1:], options, gen))
        return torch.cat(draws).to(self.device, torch.float32)

    @staticmethod
    def video_noise(shape, options: Options, generator: torch.Generator) -> torch.Tensor:
        """One video's initial noise (1, 4, f, h, w) from its own generator."""
        noise = torch.randn((1, *shape), generator=generator, device=generator.device)
        noise = mix_shared_noise(noise, options.noise.shared_noise, generator)
        ctx = options.context
        if options.noise.freenoise and ctx.applies(shape[1]):
            noise = freenoise_latents(noise, ctx.context_length, ctx.context_overlap, generator)
        return noise

    # -- control and init ------------------------------------------------------------------------
    def controls(self, options: Options, generator: torch.Generator | None) -> list:
        """SparseCtrl and ControlNet inputs for this generation, prepared once."""
        c, s = options.control, options.sampling
        size = (s.height, s.width)
        controls = []
        if c.control_images is not None:
            if self.sparsectrl is None:
                raise OptionError(
                    "control_images need a SparseCtrl encoder: load(..., sparsectrl=PATH)"
                )
            latent_size = (s.height // self.vae_scale_factor, s.width // self.vae_scale_factor)
            if self.sparsectrl.latent:
                self.offload.activate("vae")
            controls.append(
                sparsectrl_input(
                    self.sparsectrl,
                    c.control_images,
                    c.control_frames,
                    c.control_scale,
                    c.control_sample,
                    s.num_frames,
                    size,
                    self.vae,
                    latent_size,
                    generator,
                    self.device,
                )  # fmt: skip
            )
        if c.controlnet_images is not None:
            controls += controlnet_inputs(
                self.controlnets, c.controlnet_images, c.controlnet_scale, c.controlnet_start,
                c.controlnet_end, s.num_frames, size, self.device,
            )  # fmt: skip
        return controls

    def image_embeds(self, options: Options) -> IPAdapterEmbeds | None:
        """The IP-Adapter's embeddings of the reference images, computed once per generation."""
        images = options.control.ip_adapter_images
        if images is None:
            return None
        if self.ip_adapter is None:
            raise OptionError("ip_adapter_images need an IP-Adapter: load(..., ip_adapter=PATH)")
        return self.ip_adapter.embed(reference_images(images), options.sampling.num_frames)

    @contextlib.contextmanager
    def generating(self, plan: Plan) -> Iterator[None]:
        """For one generation's sampling: MotionLoRAs merged into the weights (kept as hooks
        when the UNet is streamed), the IP-Adapter attached, feed-forward chunking set; all
        undone afterwards."""
        with contextlib.ExitStack() as stack:
            if self.offload.mode != "sequential":
                stack.enter_context(lora_merged(self.motion_loras.values()))
            stack.enter_context(self.ip_adapter_attached(plan))
            stack.enter_context(self.ff_chunking(plan))
            yield

    @contextlib.contextmanager
    def ff_chunking(self, plan: Plan) -> Iterator[None]:
        """Feed-forward chunks sized for this generation's UNet calls (`ff_chunks`: 0 sizes
        them to a memory budget), on the UNet and the controls; exact."""
        frames = plan.noise.shape[2]
        ctx = plan.context
        if ctx is not None and not ctx.context_views:
            frames = min(frames, ctx.context_length)
        divides = plan.noise.shape[0] * frames
        rows = divides * (2 if plan.guided else 1)
        tokens = plan.noise.shape[-1] * plan.noise.shape[-2]
        width = 8 * self.unet.unet.config.block_out_channels[0]  # GEGLU at the top level
        itemsize = torch.finfo(self.dtype).bits // 8
        chunks = plan.options.performance.ff_chunks
        chunk = speed.ff_chunk_rows(rows, divides, tokens, width, itemsize, chunks)
        hosts = [self.unet, *(c.model for c in plan.controls)]
        previous = self.unet.ff_chunk_rows
        try:
            for host in hosts:
                _set_ff_chunking(host, chunk)
            yield
        finally:
            for host in hosts:
                _set_ff_chunking(host, previous if host is self.unet else None)

    @contextlib.contextmanager
    def ip_adapter_attached(self, plan: Plan) -> Iterator[None]:
        """The IP-Adapter in the UNet, at this generation's scale, for generations that give
        reference images; the UNet is given back exactly as it was afterwards."""
        if plan.image_embeds is None:
            yield
            return
        self.ip_adapter.scale = plan.options.control.ip_adapter_scale
        self.ip_adapter.attach(self.unet)
        try:
            yield
        finally:
            self.ip_adapter.detach()

    @staticmethod
    def init_frames(options: Options, height: int, width: int) -> torch.Tensor | None:
        i = options.init
        if i.init_video is not None:
            return as_frames(i.init_video, height, width, "init_video")
        if i.init_image is not None:
            return as_image(i.init_image, height, width, "init_image")
        return None

    @staticmethod
    def start_step(options: Options) -> int:
        """The first step when denoising from an init noised to `strength` (diffusers' rule:
        the last `int(num_steps * strength)` steps run)."""
        if options.noise.freeinit_iterations:
            raise OptionError("FreeInit re-draws the initial noise; not with an init image/video")
        steps, strength = options.sampling.num_inference_steps, options.init.strength
        return steps - min(int(steps * strength), steps)

    def init_latents(self, frames: torch.Tensor, videos: int, options: Options) -> torch.Tensor:
        """Init image (one frame, repeated) or video (its first `num_frames`) -> latents."""
        num_frames = options.sampling.num_frames
        if frames.shape[2] not in (1, num_frames) and frames.shape[2] < num_frames:
            raise OptionError(f"init video has {frames.shape[2]} frames, fewer than {num_frames}")
        if frames.shape[0] not in (1, videos):
            raise OptionError(f"{frames.shape[0]} init videos for {videos} generated videos")
        chunk = options.output.decode_chunk_size
        self.offload.activate("vae")
        latents = encode_frames(
            self.vae, frames[:, :, :num_frames].to(self.device), chunk_size=chunk
        )
        latents = latents.expand(videos, -1, num_frames, -1, -1)
        return latents.to(self.device, torch.float32).contiguous()

    # -- sampling --------------------------------------------------------------------------------
    def sample(self, plan: Plan) -> torch.Tensor:
        """The denoised latents: from noise (with FreeInit passes), or from a noised init."""
        if plan.init is None:
            return self.sample_with_freeinit(plan)
        return self.denoise(self.noised(plan), plan)

    def noised(self, plan: Plan) -> torch.Tensor:
        """The init latents diffused to the first timestep that will run; pure noise at
        strength 1 (the input is ignored), the init itself at strength 0 (nothing runs)."""
        scheduler = plan.scheduler
        if plan.start_step == 0:
            return plan.noise * scheduler.init_noise_sigma
        if plan.start_step >= plan.steps:
            return plan.init
        self._set_timesteps(plan)
        t = scheduler.timesteps[plan.start_step : plan.start_step + 1]
        return scheduler.add_noise(plan.init, plan.noise, t.repeat(plan.init.shape[0]))

    @staticmethod
    def _set_timesteps(plan: Plan) -> None:
        # on the host: the scheduler's arithmetic then takes host scalars and never waits for
        # the device (a device timestep indexing host tables would synchronise every step)
        plan.scheduler.set_timesteps(plan.steps, device="cpu")
        if plan.start_step and hasattr(plan.scheduler, "set_begin_index"):
            plan.scheduler.set_begin_index(plan.start_step)

    def sample_with_freeinit(self, plan: Plan) -> torch.Tensor:
        """FreeInit: after each full sampling, diffuse the result back to the last timestep
        with the initial noise, keep its low frequencies and take fresh high-frequency noise."""
        noise, scheduler = plan.noise, plan.scheduler
        latents = self.denoise(noise * scheduler.init_noise_sigma, plan)
        iterations = plan.options.noise.freeinit_iterations
        if iterations <= 0:
            return latents
        lpf = freq_filter(
            noise.shape[-3:],
            kind=plan.options.noise.freeinit_filter,
            device=noise.device,
            **{k: v for k, v in FREEINIT_DEFAULTS.items() if k in ("n", "d_s", "d_t")},
        )
        last = torch.full(
            (noise.shape[0],), scheduler.config.num_train_timesteps - 1, device=noise.device
        )
        gen = plan.generator
        for _ in range(iterations):
            diffused = scheduler.add_noise(latents, noise, last)
            fresh = torch.randn(noise.shape, generator=gen, device=gen.device if gen else None)
            restart = freeinit_reinit(diffused, fresh.to(noise.device), lpf)
            latents = self.denoise(restart * scheduler.init_noise_sigma, plan)
        return latents

    def denoise(self, latents: torch.Tensor, plan: Plan) -> torch.Tensor:
        """The sampling loop; the generator (continuing the seed's stream) feeds stochastic
        samplers such as Euler ancestral, so seeded runs repeat exactly. Nothing in a step
        waits for the device: what the steps need on it is prepared once (:class:`Loop`)."""
        scheduler = plan.scheduler
        self._set_timesteps(plan)
        timesteps = scheduler.timesteps  # on the host
        scale = as_motion_scale(plan.options.sampling.motion_scale)
        loop = Loop.prepare(timesteps, scale, self.device)
        steps = range(plan.start_step, len(timesteps))
        guidance = plan.options.sampling.guidance_scale
        for step in tqdm(steps, disable=not plan.progress, desc="denoising"):
            t = timesteps[step]
            guided = plan.guided_at(step)
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = scheduler.scale_model_input(model_input, t)
            noise = self.predict(model_input, loop.timesteps[step], plan, step, loop, guided)
            if guided:
                uncond, cond = noise.chunk(2)
                noise = uncond + guidance * (cond - uncond)
            latents = scheduler.step(noise, t, latents, generator=plan.generator).prev_sample
            if plan.callback is not None:
                plan.callback(step + 1 - plan.start_step, len(steps))
        return latents

    def predict(
        self, sample: torch.Tensor, t, plan: Plan, step: int, loop: Loop, guided: bool
    ) -> torch.Tensor:
        """The UNet's prediction for all frames: at once, or window by window fused per frame
        with the context options' weights (before guidance)."""
        frames, context = sample.shape[2], plan.context
        # An unguided step of a guided plan drops the unconditional rows (the first half).
        text = plan.text[plan.text.shape[0] // 2 :] if plan.guided and not guided else plan.text
        everything = list(range(frames))
        windows = context_windows(frames, step, plan.steps, context) if context else [everything]
        run = functools.partial(self.run, t=t, plan=plan, step=step, loop=loop, guided=guided)
        if windows == [everything]:
            return run(sample, text=text, frames=everything)
        if context.context_views:  # image layers see every frame; only the motion modules don't
            views = [(w, loop.fuse(context, len(w))) for w in windows]
            return run(sample, text=text, frames=everything, views=views)
        fused = WindowAccumulator.like(sample)
        for window in windows:
            sub_text = window_text(text, window, sample.shape[0], frames)
            out = run(select_frames(sample, window), text=sub_text, frames=window)
            fused.add(window, out, loop.fuse(context, len(window)))
        return fused.result()

    def run(
        self,
        x,
        *,
        t,
        text,
        frames: list[int],
        plan: Plan,
        step: int,
        loop: Loop,
        guided,
        views=None,
    ):
        """The UNet plus every control's residuals, on the video's frames `frames`."""
        x = x.to(self.dtype)
        res = total_residuals(plan.controls, x, t, text, frames, step, plan.steps, views)
        extra = res.unet_kwargs(self.dtype) if res else {}
        if plan.image_embeds is not None:
            embeds = loop.image_embeds(plan.image_embeds, frames, x.shape[0], guided)
            extra["added_cond_kwargs"] = {"image_embeds": embeds}
        kwargs = dict(motion_scale=loop.scale_for(frames), windows=views, **extra)
        return self.call_unet(
            x, t, text, kwargs, (tuple(frames), step - plan.start_step), plan, loop
        )

    def call_unet(self, x, t, text, kwargs: dict, where: tuple, plan: Plan, loop: Loop):
        """One UNet call (`where`: the frames and the step counted from the first run), float32
        out. DeepCache: the whole UNet every `deepcache_interval` steps, its deep feature reused
        between, per window."""
        if self.cuda_graphs:  # the previous call's outputs are consumed: replay over them
            torch.compiler.cudagraph_mark_step_begin()
        interval = plan.options.performance.deepcache_interval
        if interval <= 1:
            return self.unet(x, t, text, **kwargs).float()
        frames, step = where
        key = (frames, x.shape[0])
        feature = loop.features.get(key)
        if feature is None or step % interval == 0:
            out, feature = self.unet(x, t, text, return_deep_feature=True, **kwargs)
            loop.features[key] = feature.clone()  # a graph replay would overwrite it
            return out.float()
        return self.unet(x, t, text, deep_feature=feature, **kwargs).float()

    def decode(
        self, latents: torch.Tensor, chunk_size: int = 16, tiling: str = "auto"
    ) -> torch.Tensor:
        """(b, 4, f, h, w) latents -> (b, 3, f, H, W) float32 frames in [0, 1], on the CPU
        (`chunk_size`: at most so many frames per VAE call; `tiling`: auto, on, off)."""
        self.offload.activate("vae")
        return decode_latents(self.vae, latents, chunk_size, tiling)


def _set_ff_chunking(host, rows: int | None) -> None:
    if isinstance(host, SparseControlNet):
        host = host.net
    if isinstance(host, MotionUNet):
        host.set_ff_chunking(rows)
    else:
        set_ff_chunking(host, rows)


def _prompt_json(prompt: Prompt):
    """Prompts as they go into the saved JSON: a string, a list, or a map with string keys."""
    if isinstance(prompt, Mapping):
        return {str(k): v for k, v in prompt.items()}
    return prompt if isinstance(prompt, str) else list(prompt)


def _prompt_keys(
    prompt: Prompt, num_frames: int, head: str, tail: str
) -> list[tuple[int | None, str]]:
    """(keyframe, text) for a prompt map; (None, text) for each prompt of a string or list."""
    if isinstance(prompt, Mapping):
        return travel_prompts(prompt, num_frames, head, tail)
    return [(None, compose_prompt(head, p, tail)) for p in as_list(prompt)]


def _embeddings(keys, encoded: torch.Tensor, num_frames: int, method: str) -> torch.Tensor:
    """(P, n, d) for P prompts; (num_frames, n, d) for a prompt map (keyframes interpolated)."""
    if keys and keys[0][0] is not None:
        return frame_embeddings([(f, e) for (f, _), e in zip(keys, encoded)], num_frames, method)
    return encoded


def _rows(text: torch.Tensor, num_frames: int, videos: int, travel: bool) -> torch.Tensor:
    """Per-video rows repeated for each video of a prompt; per-frame rows for each video."""
    if travel:
        return text.repeat(videos, 1, 1)
    return text.repeat_interleave(videos, dim=0)
