"""The training loop, on Hugging Face Accelerate (one CPU to many GPUs, DDP/FSDP/DeepSpeed).

Determinism is by construction: the sample ids of optimisation step k are a fixed function of
(seed, k), and each sample's clip choice, VAE sampling, noise and timestep come from a generator
seeded by (seed, step, position in the global batch). So a resumed run sees exactly the data and
noise the uninterrupted one would have, and N processes with batch B/N see what one process with
batch B sees.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from ..checkpoints.base import load_base
from ..checkpoints.io import load_state_dict, save_state_dict
from .config import Config, ConfigError
from .data import EncodedClips, VideoClips, collate, collate_encoded, find_clips
from .loss import diffusion_loss, make_noise_scheduler
from .stages import TrainModel, use_safe_groupnorm

STATE_FILE = "training_state.pt"
WEIGHTS_FILE = "trainable.safetensors"


class StepSampler(Sampler):
    """Yields, for each micro-step from `start`, this process's sample ids of the global batch."""

    def __init__(
        self, size: int, global_batch: int, rank: int, world: int, start: int, total: int, seed: int
    ):
        self.size, self.global_batch, self.rank, self.world = size, global_batch, rank, world
        self.start, self.total, self.seed = start, total, seed
        self._perms: dict[int, list[int]] = {}

    def _perm(self, epoch: int) -> list[int]:
        if epoch not in self._perms:
            gen = torch.Generator().manual_seed(self.seed + 7919 * epoch)
            self._perms[epoch] = torch.randperm(self.size, generator=gen).tolist()
        return self._perms[epoch]

    def ids(self, micro_step: int) -> list[int]:
        local = self.global_batch // self.world
        ids = []
        for j in range(self.rank * local, (self.rank + 1) * local):
            position = micro_step * self.global_batch + j
            epoch, offset = divmod(position, self.size)
            ids.append(epoch * self.size + self._perm(epoch)[offset])
        return ids

    def __iter__(self):
        for k in range(self.start, self.total):
            yield self.ids(k)

    def __len__(self) -> int:
        return self.total - self.start


def _sample_generators(seed: int, micro_step: int, positions: range) -> list[torch.Generator]:
    return [
        torch.Generator().manual_seed((seed + 1) * 2_000_003 + micro_step * 65_537 + j)
        for j in positions
    ]


class Trainer:
    def __init__(self, config: Config, resume: bool = False):
        from accelerate import Accelerator
        from accelerate.utils import set_seed

        self.config = config
        self.out = Path(config.output_dir)
        self.train = config.train
        trackers = [t for t in config.report_to if t == "tensorboard" or _has_module(t)]
        # torchrun on a machine without GPUs: one data-parallel run on gloo, not N separate ones.
        cpu_world = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        self.accelerator = Accelerator(
            cpu=cpu_world,
            mixed_precision=self.train.mixed_precision,
            gradient_accumulation_steps=self.train.gradient_accumulation,
            log_with=trackers or None,
            project_dir=str(self.out),
        )
        # New trainable weights (LoRA, a new motion module) are drawn from the global RNG:
        # seed it, so the seed alone decides the run, in every process.
        set_seed(self.train.seed)
        self.image, self.model = self._build_models()
        if self.accelerator.device.type == "cpu":
            use_safe_groupnorm(self.model)
        self.dataset = self._build_dataset()
        self.noise_scheduler = make_noise_scheduler(self.train.noise)
        # The noise prior as the stage resolved it (a motion module's own shared_noise).
        shared = self.model.shared_noise if self.model.video else None
        self.noise = dataclasses.replace(self.train.noise, shared_noise=shared)
        self.optimizer = self._build_optimizer()
        self.lr_scheduler = self._build_lr_scheduler()
        self.ema = self._build_ema()
        self.step = 0
        self.skipped: list[str] = []
        if resume:
            self._resume()
        # The LR scheduler stays unprepared: Accelerate would step it once per process, which
        # would make N-process runs follow another schedule than one-process runs.
        self.model, self.optimizer = self.accelerator.prepare(self.model, self.optimizer)
        if self.train.compile:
            self.model = torch.compile(self.model)

    # -- building --------------------------------------------------------------------------------
    def _build_models(self):
        base = self.config.base
        if base is None:
            from ..builtin import builtin_model

            base = builtin_model().base
        image = load_base(base)
        for part in (image.vae, image.text_encoder):
            part.requires_grad_(False)
        model = TrainModel(self.config, image)
        model.set_gradient_checkpointing(self.train.gradient_checkpointing)
        device = self.accelerator.device
        image.vae.to(device)
        image.text_encoder.to(device)
        return image, model.to(device)

    def _build_dataset(self):
        data = self.config.data
        if data.cache:
            return EncodedClips(data.cache, self.train.seed)
        frames = data.num_frames if self.model.video else 1
        return VideoClips(find_clips(data), data, frames, self.train.seed)

    def _build_optimizer(self):
        params = self.model.trainable()
        if not params:
            raise ConfigError(f"stage {self.config.stage} has nothing to train")
        lr, wd = self.train.learning_rate, self.train.weight_decay
        if self.train.adam_8bit:
            try:
                import bitsandbytes as bnb
            except ImportError as e:
                raise ConfigError("train.adam_8bit needs the bitsandbytes package") from e
            return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=wd)
        return torch.optim.AdamW(params, lr=lr, weight_decay=wd)

    def _build_lr_scheduler(self):
        from diffusers.optimization import get_scheduler

        name = {"constant": "constant_with_warmup"}.get(
            self.train.lr_scheduler, self.train.lr_scheduler
        )
        return get_scheduler(
            name,
            self.optimizer,
            num_warmup_steps=self.train.warmup_steps,
            num_training_steps=self.train.steps,
        )

    def _build_ema(self):
        if self.train.ema_decay is None:
            return None
        from diffusers.training_utils import EMAModel

        return EMAModel(self.model.trainable(), decay=self.train.ema_decay)

    # -- the loop --------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.train.batch_size * self.accelerator.num_processes

    def loader(self) -> DataLoader:
        acc = self.accelerator
        micro_start = self.step * self.train.gradient_accumulation
        sampler = StepSampler(
            len(self.dataset),
            self.global_batch,
            acc.process_index,
            acc.num_processes,
            micro_start,
            self.train.steps * self.train.gradient_accumulation,
            self.train.seed,
        )
        return DataLoader(
            self.dataset,
            batch_sampler=sampler,
            collate_fn=collate_encoded if self.config.data.cache else collate,
            num_workers=self.config.data.num_workers,
            persistent_workers=False,
        )

    def fit(self) -> list[Path]:
        acc = self.accelerator
        if acc.is_main_process:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.json").write_text(
                json.dumps(self.config.to_dict(), indent=2, default=str)
            )
        acc.init_trackers("train")
        bar = tqdm(
            total=self.train.steps,
            initial=self.step,
            disable=not acc.is_main_process,
            desc=f"train {self.config.stage}",
        )
        micro = self.step * self.train.gradient_accumulation
        window_start, window_samples, losses = time.perf_counter(), 0, []
        previous = self._catch_signals()
        try:
            for batch in self.loader():
                loss = self._micro_step(batch, micro)
                micro += 1
                losses.append(loss)
                window_samples += self.global_batch
                if acc.sync_gradients:
                    self.step += 1
                    bar.update(1)
                    rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                    mean_loss = sum(losses) / len(losses)
                    bar.set_postfix(loss=f"{mean_loss:.4f}")
                    if self.step % self.train.log_every == 0 or self.step == self.train.steps:
                        self._log(mean_loss, rate, batch)
                    window_start, window_samples, losses = time.perf_counter(), 0, []
                    self._maybe_checkpoint()
                    self._maybe_validate()
                    if self._stop_agreed():
                        # Keep what was done: a checkpoint at this completed step, then stop.
                        self.save_checkpoint()
                        raise KeyboardInterrupt(f"stopped at step {self.step}; --resume continues")
        finally:
            self._restore_signals(previous)
        bar.close()
        results = self.finish()
        acc.end_training()
        return results

    _stop_requested = False

    def _catch_signals(self) -> dict:
        """Ctrl-C / SIGTERM finish the current step instead of tearing it in half."""
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            self._stop_requested = True

        return {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}

    def _stop_agreed(self) -> bool:
        """All processes stop at the same step if any of them was asked to."""
        flag = torch.tensor(float(self._stop_requested), device=self.accelerator.device)
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag > 0)

    @staticmethod
    def _restore_signals(previous: dict) -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    def _micro_step(self, batch: dict, micro: int) -> float:
        acc = self.accelerator
        local = self.train.batch_size
        positions = range(acc.process_index * local, (acc.process_index + 1) * local)
        gens = _sample_generators(self.train.seed, micro, positions)
        self.skipped += batch["skipped"]
        with acc.accumulate(self.model):
            latents, text = self._encode(batch, gens)
            with acc.autocast():
                loss = diffusion_loss(
                    lambda x, t: self.model(x, t, text),
                    latents,
                    self.noise_scheduler,
                    self.noise,
                    gens,
                )
            acc.backward(loss)
            if acc.sync_gradients and self.train.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients and self.ema is not None:
            self.ema.step(acc.unwrap_model(self.model).trainable())
        return float(acc.reduce(loss.detach(), reduction="mean"))

    @torch.no_grad()
    def _encode(self, batch: dict, gens: list[torch.Generator]):
        """Latents from the frozen VAE (sampled from its posterior, seeded per sample) and
        text embeddings from the frozen text encoder."""
        device = self.accelerator.device
        if "latent_mean" in batch:
            mean, std = batch["latent_mean"].to(device), batch["latent_std"].to(device)
        else:
            mean, std = self._posterior(batch["pixels"].to(device))
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(device)
        latents = (mean + std * eps) * self.image.vae.config.scaling_factor
        if not self.model_video:
            latents = latents[:, :, 0]  # image stages: (b, c, h, w)
        captions = [
            c if torch.rand((), generator=g) >= self.config.data.caption_dropout else ""
            for c, g in zip(batch["captions"], gens)
        ]
        from ..pipeline.prompt import encode_prompts, tokenize

        if self.accelerator.unwrap_model(self.model).text_encoder is not None:
            return latents, tokenize(self.image.tokenizer, captions).to(device)  # trained
        text = encode_prompts(self.image.tokenizer, self.image.text_encoder, captions)
        return latents, text

    @property
    def model_video(self) -> bool:
        return self.accelerator.unwrap_model(self.model).video

    def _posterior(self, pixels: torch.Tensor):
        b, c, f, h, w = pixels.shape
        flat = pixels.transpose(1, 2).reshape(b * f, c, h, w)
        dist = self.image.vae.encode(flat).latent_dist
        unfold = lambda t: t.view(b, f, *t.shape[1:]).transpose(1, 2)  # noqa: E731
        return unfold(dist.mean), unfold(dist.std)

    # -- logging, checkpoints, results -----------------------------------------------------------
    def _log(self, loss: float, rate: float, batch) -> None:
        record = {
            "step": self.step,
            "loss": loss,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "samples_per_s": rate,
            "skipped": len(self.skipped),
        }
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        if self.accelerator.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _maybe_checkpoint(self) -> None:
        every = self.config.checkpoint.every
        if every and self.step % every == 0 and self.step < self.train.steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path | None:
        """Trainable weights + optimizer, LR schedule, grad scaler, EMA, RNG and step, written
        to a temporary folder and renamed; only the last `keep` are kept."""
        acc = self.accelerator
        acc.wait_for_everyone()
        if not acc.is_main_process:
            return None
        root = self._checkpoint_dir()
        root.mkdir(parents=True, exist_ok=True)
        final = root / f"step-{self.step:08d}"
        tmp = root / f".tmp-step-{self.step:08d}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        model = acc.unwrap_model(self.model)
        save_state_dict(
            {k: v.detach().cpu().contiguous() for k, v in model.trainable_state_dict().items()},
            tmp / WEIGHTS_FILE,
        )
        state = {
            "step": self.step,
            "optimizer": self.optimizer.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "scaler": acc.scaler.state_dict() if acc.scaler is not None else None,
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate()},
            "skipped": len(self.skipped),
        }
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in sorted(root.glob("step-*"))[: -self.config.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self._checkpoint_dir().glob("step-*"))
        return found[-1] if found else None

    def _resume(self) -> None:
        ckpt = self.latest_checkpoint()
        if ckpt is None:
            raise ConfigError(f"--resume: no checkpoint in {self._checkpoint_dir()}")
        weights = load_state_dict(ckpt / WEIGHTS_FILE)
        missing = set(self.model.trainable_state_dict()) - set(weights)
        if missing:
            raise ConfigError(f"{ckpt}: checkpoint lacks {sorted(missing)[:3]}")
        self.model.load_state_dict(weights, strict=False)
        state = torch.load(ckpt / STATE_FILE, map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if state["ema"] is not None and self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        if state["scaler"] is not None and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        random.setstate(state["rng"]["python"])
        self.step = state["step"]

    def _maybe_validate(self) -> None:
        v = self.config.validation
        if v.every and v.prompts and self.step % v.every == 0 and self.accelerator.is_main_process:
            self.validate()

    @torch.no_grad()
    def validate(self) -> list[Path]:
        from ..motion import MotionModuleConfig, MotionModules, MotionUNet
        from ..pipeline import AnimationPipeline

        model = self.accelerator.unwrap_model(self.model)
        v = self.config.validation
        motion_unet = model.motion_unet
        temporary = None
        if motion_unet is None:  # image stages: frames without a motion module
            cfg = MotionModuleConfig.preset(
                "v3", block_out_channels=tuple(model.unet2d.config.block_out_channels)
            )
            temporary = motion_unet = MotionUNet(
                model.unet2d, MotionModules(cfg).to(self.accelerator.device)
            )
        was_training = model.training
        model.eval()
        pipe = AnimationPipeline(self.image, motion_unet)
        paths = []
        try:
            for i, prompt in enumerate(v.prompts):
                video = pipe(
                    prompt,
                    num_frames=v.num_frames if model.video else 1,
                    height=self.config.data.sample_size[1],
                    width=self.config.data.sample_size[0],
                    num_inference_steps=v.steps,
                    guidance_scale=v.guidance_scale,
                    seed=v.seed + i,
                    progress=False,
                )
                paths += video.save(
                    self.out / "validation" / f"step-{self.step:08d}-{i}.gif", overwrite=True
                )
        finally:
            if temporary is not None:
                temporary.remove()
            model.train(was_training)
        return paths

    def finish(self) -> list[Path]:
        acc = self.accelerator
        acc.wait_for_everyone()
        results = []
        if acc.is_main_process:
            model = acc.unwrap_model(self.model)
            if self.ema is not None:
                self.ema.copy_to(model.trainable())
            results = model.save_results(self.out, self.config, self.step)
            _plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            if self.skipped:
                print(
                    f"skipped {len(self.skipped)} unreadable or too-short videos; "
                    f"first: {self.skipped[0]}"
                )
        # All processes leave together, so none tears down the process group while another
        # still writes (the main one saves after the others are done).
        acc.wait_for_everyone()
        return results


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def _plot_losses(metrics: Path, png: Path) -> None:
    """A small loss-curve image drawn with Pillow (no plotting dependency)."""
    from PIL import Image, ImageDraw

    if not metrics.exists():
        return
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    if not rows:
        return
    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    steps = [r["step"] for r in rows]
    losses = [r["loss"] for r in rows]
    lo, hi = min(losses), max(losses)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(hi - lo, 1e-12)
    points = [
        (pad + (s - steps[0]) / span_x * (w - 2 * pad), h - pad - (v - lo) / span_y * (h - 2 * pad))
        for s, v in zip(steps, losses)
    ]
    draw.rectangle([pad, pad, w - pad, h - pad], outline="gray")
    if len(points) > 1:
        draw.line(points, fill="blue", width=2)
    draw.text(
        (pad, 10), f"loss {lo:.4g} .. {hi:.4g}, steps {steps[0]} .. {steps[-1]}", fill="black"
    )
    img.save(png)
