"""The diffusion training objective, with every random draw seeded per sample."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import DDPMScheduler

from ..pipeline.noise import mix_shared_noise
from ..schedule import ANIMATEDIFF_SCHEDULE
from .config import NoiseConfig


def make_noise_scheduler(noise: NoiseConfig) -> DDPMScheduler:
    """AnimateDiff's training schedule: `linear` betas 0.00085 -> 0.012 by default."""
    config = {
        **ANIMATEDIFF_SCHEDULE,
        "beta_schedule": noise.beta_schedule,
        "prediction_type": noise.prediction_type,
    }
    return DDPMScheduler(**config)


def sample_noise(
    shape: tuple[int, ...], generators: list[torch.Generator], offset: float, shared: float = 0.0
):
    """Per-sample Gaussian noise (and timesteps drawn after it) from each sample's generator.

    Videos (b, c, f, h, w) with ``shared`` > 0 follow the mixed noise prior that sampling uses
    (``pipeline.noise.mix_shared_noise``): each sample's common frame is drawn after its own
    noise, from its own generator."""
    noise = torch.stack([torch.randn(shape[1:], generator=g) for g in generators])
    if shared and len(shape) == 5:
        noise = torch.cat([mix_shared_noise(n[None], shared, g) for n, g in zip(noise, generators)])
    if offset:
        # Offset noise: a per-channel constant shift, so the model can learn overall brightness.
        extra = (1,) * (len(shape) - 2)
        noise += offset * torch.stack(
            [torch.randn(shape[1], *extra, generator=g) for g in generators]
        )
    return noise


def diffusion_loss(
    predict: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    latents: torch.Tensor,
    scheduler: DDPMScheduler,
    noise_config: NoiseConfig,
    generators: list[torch.Generator],
) -> torch.Tensor:
    """Mean over samples of the (optionally min-SNR weighted) MSE of the model's prediction."""
    device = latents.device
    shape, shared = tuple(latents.shape), noise_config.shared_noise or 0.0
    noise = sample_noise(shape, generators, noise_config.offset_noise, shared).to(device)
    lo, hi = noise_config.timesteps
    t = torch.stack([torch.randint(lo, hi, (), generator=g) for g in generators]).to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    if noise_config.prediction_type == "epsilon":
        target = noise
    else:
        target = scheduler.get_velocity(latents, noise, t)
    prediction = predict(noisy, t)
    per_sample = ((prediction.float() - target.float()) ** 2).flatten(1).mean(1)
    if noise_config.min_snr_gamma:
        per_sample = per_sample * min_snr_weight(scheduler, t, noise_config)
    return per_sample.mean()


def min_snr_weight(scheduler: DDPMScheduler, t: torch.Tensor, noise: NoiseConfig) -> torch.Tensor:
    """Min-SNR-gamma weighting (Hang et al. 2023): min(SNR, gamma) / SNR for epsilon targets,
    / (SNR + 1) for v targets."""
    alpha_bar = scheduler.alphas_cumprod.to(t.device)[t]
    snr = alpha_bar / (1 - alpha_bar)
    clipped = snr.clamp(max=noise.min_snr_gamma)
    return clipped / (snr + 1 if noise.prediction_type == "v_prediction" else snr)
