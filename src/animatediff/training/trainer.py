"""The training loop, on Hugging Face Accelerate (one CPU to many GPUs, DDP/FSDP/DeepSpeed).

Determinism is by construction (`steps.py`): a resumed run sees exactly the data and noise the
uninterrupted one would have, and N processes with batch B/N see what one process with batch B
sees. Checkpoints: `checkpoint.py`; the output folder's rules: `outputs.py`.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..builtin.model import resolve
from ..checkpoints.base import load_base
from ..errors import CheckpointError, UserError
from ..motion.frames import fold_frames, unfold_frames
from ..pipeline.prompt import encode_prompts, token_ids
from .checkpoint import Checkpoints, RunState
from .config import Config, ConfigError, load_config, parse_config
from .data import EncodedClips, VideoClips, check_clips, collate, collate_encoded, find_clips
from .distill import ConsistencySolver, consistency_loss
from .loss import diffusion_loss, make_noise_scheduler
from .outputs import OutputSwap, check_output_dir
from .report import plot_losses, validate
from .stages import TrainModel, use_safe_groupnorm
from .steps import StepSampler, sample_generators

log = logging.getLogger("animatediff")
COUNTERS = ("skipped", "uncaptioned")  # per-sample counts, summed over processes and steps


class TrainingDiverged(UserError):
    """The loss stopped being a finite number."""


class Trainer:
    """One training run of a `Config`. `resume`: continue from the latest checkpoint in
    output_dir; `overwrite`: replace the run there (see `outputs.py`); a non-empty output_dir
    is refused otherwise. Every check runs before any model loads."""

    def __init__(self, config: Config, resume: bool = False, overwrite: bool = False):
        self.config = config
        self.out = Path(config.output_dir)
        self.train = config.train
        check_output_dir(self.out, resume, overwrite)
        created = not self.out.exists()
        self.dataset = self._build_dataset()
        self.accelerator = self._build_accelerator()
        # New trainable weights (LoRA, a new motion module) are drawn from the global RNG:
        # seed it, so the seed alone decides the run, in every process.
        set_seed(self.train.seed)
        self.image, self.model = self._build_models()
        if self.accelerator.device.type == "cpu":
            use_safe_groupnorm(self.model)
        self.noise_scheduler = make_noise_scheduler(self.train.noise)
        self.solver, self.uncond = self._build_distillation()
        # The noise prior as the stage resolved it (a motion module's own shared_noise).
        shared = self.model.shared_noise if self.model.video else None
        self.noise = dataclasses.replace(self.train.noise, shared_noise=shared)
        self.optimizer = self._build_optimizer()
        self.ema = self._build_ema()
        self.step = 0
        self.counts = dict.fromkeys(COUNTERS, 0)
        # The LR schedule steps once per optimisation step whatever the number of processes
        # (`step_scheduler_with_optimizer=False`), so N-process runs follow one-process runs.
        self.model, self.optimizer, self.lr_scheduler = self.accelerator.prepare(
            self.model, self.optimizer, self._build_lr_scheduler()
        )
        state = RunState(self._state_tensors, self._progress, self._restore)
        keep = config.checkpoint.keep
        self.checkpoints = Checkpoints(self.accelerator, self.out / "checkpoints", keep, state)
        main = self.accelerator.is_main_process
        self.outputs = OutputSwap(self.out, created) if main and not resume else None
        if resume:
            self.checkpoints.resume()
        if self.train.compile:
            self.model = torch.compile(self.model)

    # -- building --------------------------------------------------------------------------------
    def _build_accelerator(self) -> Accelerator:
        trackers = [t for t in self.config.report_to if t == "tensorboard" or _has_module(t)]
        # torchrun on a machine without GPUs: one data-parallel run on gloo, not N separate ones.
        cpu_world = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
        return Accelerator(
            cpu=cpu_world,
            mixed_precision=self.train.mixed_precision,
            gradient_accumulation_steps=self.train.gradient_accumulation,
            log_with=trackers or None,
            project_dir=str(self.out),
            step_scheduler_with_optimizer=False,
        )

    def _build_models(self):
        base, _ = resolve(self.config.base)
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
        """The clips, checked before any model loads; clips without a caption are reported."""
        data = self.config.data
        frames = data.num_frames if self.config.video else 1
        if data.cache:
            dataset = EncodedClips(data.cache, self.train.seed)
            if self.config.video and dataset.num_frames() != frames:
                raise ConfigError(
                    f"data.num_frames is {frames} but the clips in data.cache {data.cache} have "
                    f"{dataset.num_frames()} frames (encode them again with this config)"
                )
            captions = dataset.captions
        else:
            clips = find_clips(data)
            check_clips(clips, frames)
            dataset = VideoClips(clips, data, frames, self.train.seed)
            captions = [c.caption for c in clips]
        missing = sum(not c.strip() for c in captions)
        if missing and int(os.environ.get("RANK", "0")) == 0:
            log.warning(
                f"{missing} of {len(captions)} clips have no caption (no .txt, or an empty one): "
                "they train as unconditional samples, counted as `uncaptioned` in metrics.jsonl"
            )
        return dataset

    def _build_distillation(self):
        """The distill stage's solver and the empty prompt's embedding (its guidance)."""
        if self.config.stage != "distill":
            return None, None
        d = self.config.distill
        solver = ConsistencySolver(
            self.noise_scheduler.alphas_cumprod,
            d.solver_steps,
            d.timestep_scaling,
            self.train.noise.prediction_type,
        )
        with torch.no_grad():
            uncond = encode_prompts(self.image.tokenizer, self.image.text_encoder, [""])
        return solver, uncond.to(self.accelerator.device)

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
        return EMAModel(self.model.trainable(), decay=self.train.ema_decay)

    # -- the loop --------------------------------------------------------------------------------
    @property
    def global_batch(self) -> int:
        return self.train.batch_size * self.accelerator.num_processes

    @property
    def unwrapped(self) -> TrainModel:
        return self.accelerator.unwrap_model(self.model)

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
        """Train to `train.steps`; returns the files written (the stage's results)."""
        try:
            self._start()
            self._loop()
            results = self.finish()
        except BaseException:
            if self.outputs is not None:
                self.outputs.roll_back()  # a failed start: the previous run comes back
            raise
        self.accelerator.end_training()
        return results

    def _start(self) -> None:
        acc = self.accelerator
        if self.outputs is not None:
            replaced = self.outputs.replace_previous()
            if replaced:
                log.warning(f"--overwrite: replacing {', '.join(replaced)} in {self.out}")
        if acc.is_main_process:
            (self.out / "config.json").write_text(
                json.dumps(self.config.to_dict(), indent=2, default=str)
            )
        acc.wait_for_everyone()
        acc.init_trackers("train")

    def _loop(self) -> None:
        acc = self.accelerator
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
                losses.append(self._micro_step(batch, micro))
                micro += 1
                window_samples += self.global_batch
                if not acc.sync_gradients:
                    continue
                self.step += 1
                bar.update(1)
                rate = window_samples / max(time.perf_counter() - window_start, 1e-9)
                mean_loss = sum(losses) / len(losses)
                bar.set_postfix(loss=f"{mean_loss:.4f}")
                if self.step % self.train.log_every == 0 or self.step == self.train.steps:
                    self._log(mean_loss, rate)
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
        gens = sample_generators(self.train.seed, micro, positions)
        with acc.accumulate(self.model):
            latents, text = self._encode(batch, gens)
            with acc.autocast():
                loss = self._loss(latents, text, gens)
            acc.backward(loss)
            if acc.sync_gradients and self.train.max_grad_norm:
                acc.clip_grad_norm_(self.model.parameters(), self.train.max_grad_norm)
            self.optimizer.step()
            if acc.sync_gradients:
                self.lr_scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        if acc.sync_gradients:
            self._after_update()
        return self._gather(loss, batch)

    def _loss(self, latents: torch.Tensor, text: torch.Tensor, gens: list) -> torch.Tensor:
        """The stage's objective: denoising, or consistency distillation from the teacher."""
        if self.solver is None:
            predict = lambda x, t: self.model(x, t, text)  # noqa: E731
            return diffusion_loss(predict, latents, self.noise_scheduler, self.noise, gens)
        model, uncond = self.unwrapped, self.uncond.expand(len(latents), -1, -1)
        return consistency_loss(
            lambda x, t: self.model(x, t, text),
            lambda x, t: model.teacher(x, t, text, uncond),
            lambda x, t: model.target(x, t, text),
            latents,
            self.noise_scheduler,
            self.solver,
            self.config.distill,
            gens,
            self.noise.offset_noise,
            self.noise.shared_noise or 0.0,
        )

    def _after_update(self) -> None:
        """After an optimisation step: the EMA of the weights and the distillation target."""
        if self.ema is not None:
            self.ema.step(self.unwrapped.trainable())
        if self.solver is not None:
            self.unwrapped.update_target(self.config.distill.target_ema)

    def _gather(self, loss: torch.Tensor, batch: dict) -> float:
        """The mean loss over processes; the sample counters summed into `counts`."""
        acc = self.accelerator
        local = [float(len(batch["skipped"])), float(sum(not c.strip() for c in batch["captions"]))]
        stats = torch.stack([loss.detach().float(), *torch.tensor(local, device=loss.device)])
        if acc.num_processes > 1:
            stats = acc.reduce(stats, reduction="sum")
            stats[0] /= acc.num_processes
        for name, value in zip(COUNTERS, stats[1:].tolist()):
            self.counts[name] += int(value)
        value = float(stats[0])
        if not torch.isfinite(stats[0]):
            raise TrainingDiverged(
                f"training diverged at step {self.step + 1}: the loss is {value}; lower "
                "train.learning_rate (or use mixed_precision: no); --resume restarts from the "
                "last checkpoint"
            )
        return value

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
        if not self.config.video:
            latents = latents[:, :, 0]  # image stages: (b, c, h, w)
        captions = [
            c if torch.rand((), generator=g) >= self.config.data.caption_dropout else ""
            for c, g in zip(batch["captions"], gens)
        ]
        if self.unwrapped.text_encoder is not None:  # trained: it encodes in the forward pass
            return latents, token_ids(self.image.tokenizer, captions).to(device)
        text = encode_prompts(
            self.image.tokenizer, self.image.text_encoder, captions, attention_syntax=False
        )
        return latents, text

    def _posterior(self, pixels: torch.Tensor):
        dist = self.image.vae.encode(fold_frames(pixels)).latent_dist
        frames = pixels.shape[2]
        return unfold_frames(dist.mean, frames), unfold_frames(dist.std, frames)

    # -- logging, checkpoints, results -----------------------------------------------------------
    def _log(self, loss: float, rate: float) -> None:
        record = {
            "step": self.step,
            "loss": loss,
            "lr": self.lr_scheduler.get_last_lr()[0],
            "samples_per_s": rate,
            **self.counts,
        }
        self.accelerator.log({k: v for k, v in record.items() if k != "step"}, step=self.step)
        if self.accelerator.is_main_process:
            with (self.out / "metrics.jsonl").open("a") as f:
                f.write(json.dumps(record) + "\n")

    def _maybe_checkpoint(self) -> None:
        every = self.config.checkpoint.every
        if every and self.step % every == 0 and self.step < self.train.steps:
            self.save_checkpoint()

    def save_checkpoint(self) -> Path:
        """Everything needed to continue at this step (`checkpoint.py`); every process calls it."""
        path = self.checkpoints.save(self.step)
        if self.outputs is not None:
            self.outputs.commit()
        return path

    def latest_checkpoint(self) -> Path | None:
        return self.checkpoints.latest()

    # What the checkpoint hooks save and restore besides Accelerate's own state.
    def _state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        model = self.unwrapped
        groups = {"trainable": model.trainable_state_dict()}
        if self.solver is not None:
            groups["target"] = model.target_state_dict()
        if self.ema is not None:
            groups["ema"] = dict(zip(model.trainable_state_dict(), self.ema.shadow_params))
        return groups

    def _progress(self) -> dict:
        ema = None
        if self.ema is not None:
            ema = {k: v for k, v in self.ema.state_dict().items() if k != "shadow_params"}
        return {"step": self.step, "counts": dict(self.counts), "ema": ema}

    def _restore(self, tensors: dict[str, dict[str, torch.Tensor]], progress: dict) -> None:
        model = self.unwrapped
        expected = {"trainable": model.trainable_state_dict()}
        if self.solver is not None:
            expected["target"] = model.target_state_dict()
        for group, own in expected.items():
            missing = set(own) - set(tensors.get(group, {}))
            if missing:
                raise CheckpointError(
                    self.latest_checkpoint() or self.out,
                    f"{group} weights lack {sorted(missing)[:3]} (a checkpoint of another run?)",
                )
            with torch.no_grad():
                for name, value in own.items():
                    value.copy_(tensors[group][name])
        if self.ema is not None and progress.get("ema") is not None:
            params = model.trainable_state_dict()
            shadow = [tensors["ema"][n].to(p.device) for n, p in params.items()]
            self.ema.load_state_dict({**progress["ema"], "shadow_params": shadow})
        self.step = int(progress["step"])
        self.counts.update({k: int(v) for k, v in progress.get("counts", {}).items()})

    def _maybe_validate(self) -> None:
        v = self.config.validation
        if v.every and v.prompts and self.step % v.every == 0 and self.accelerator.is_main_process:
            self.validate()

    @torch.no_grad()
    def validate(self) -> list[Path]:
        """Sample the validation prompts with the model as it is now (`report.validate`)."""
        model = self.unwrapped
        return validate(self.image, model, self.config, self.out / "validation", self.step)

    def finish(self) -> list[Path]:
        acc = self.accelerator
        acc.wait_for_everyone()
        results = []
        if acc.is_main_process:
            model = self.unwrapped
            if self.ema is not None:
                self.ema.copy_to(model.trainable())
            results = model.save_results(self.out, self.config, self.step)
            if self.outputs is not None:
                self.outputs.commit()
            plot_losses(self.out / "metrics.jsonl", self.out / "loss.png")
            for name in COUNTERS:
                if self.counts[name]:
                    log.warning(f"{self.counts[name]} samples were {name} (see metrics.jsonl)")
        # All processes leave together, so none tears down the process group while another
        # still writes (the main one saves after the others are done).
        acc.wait_for_everyone()
        return results


def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def train(
    config: Config | dict | str | Path, resume: bool = False, overwrite: bool = False
) -> list[Path]:
    """Run a training config (a `Config`, a dict as in the YAML, or a YAML path); returns the
    files written (motion module, MotionLoRA, adapter or UNet). A non-empty output_dir needs
    `resume` (continue from its latest checkpoint) or `overwrite` (replace that run)."""
    if isinstance(config, (str, Path)):
        config = load_config(config)
    elif isinstance(config, dict):
        config = parse_config(config)
    return Trainer(config, resume=resume, overwrite=overwrite).fit()
