"""Consistency distillation of a motion module, as AnimateLCM does it (Wang et al. 2024, after
Latent Consistency Models, Luo et al. 2023).

One training sample: a clip's latents x0 are noised to a timestep t of the solver's grid (every
`1000 // solver_steps` steps: 19, 39, ..., 999 for 50). The teacher (the image model with the
teacher motion module) predicts at t with and without the caption, its guided prediction (the
guidance scale w drawn per sample: guidance is folded into the student) takes one DDIM step to
t' = t - 1000 // solver_steps, and the target network (an EMA of the student) maps x_t' to its
clean estimate. The student learns to map x_t to the same estimate:

    f(x, t) = c_skip(t) * x + c_out(t) * x0_pred(x, t)
    loss    = d(f_student(x_t, t), f_target(x_t', t'))      (pseudo-Huber or L2)

with the LCM sampler's boundary scalings (`c_skip(0) = 1, c_out(0) = 0`). The student samples
with diffusers' `LCMScheduler` on the same schedule (`original_inference_steps = solver_steps`).
Every random draw (noise, grid index, w) comes from the sample's own generator.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .config import DistillConfig
from .loss import sample_noise

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy, t) -> model output
SIGMA_DATA = 0.5  # LCM's


def _per_sample(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] shaped (b, 1, 1, ...) to broadcast over samples of `ndim` dimensions."""
    return values.to(t.device)[t].view(-1, *([1] * (ndim - 1)))


@dataclass
class ConsistencySolver:
    """The DDIM solver grid of the teacher's ODE and the consistency function's scalings."""

    alphas_cumprod: torch.Tensor  # (1000,) float64, the training schedule
    solver_steps: int = 50
    timestep_scaling: float = 10.0
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        self.alphas_cumprod = self.alphas_cumprod.double()
        self.skip = len(self.alphas_cumprod) // self.solver_steps
        self.timesteps = torch.arange(1, self.solver_steps + 1) * self.skip - 1

    def boundary(self, t: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        """c_skip(t), c_out(t) as the LCM scheduler computes them."""
        scaled = t.double() * self.timestep_scaling
        c_skip = SIGMA_DATA**2 / (scaled**2 + SIGMA_DATA**2)
        c_out = scaled / (scaled**2 + SIGMA_DATA**2) ** 0.5
        shape = (-1, *([1] * (ndim - 1)))
        return c_skip.view(shape), c_out.view(shape)

    def x0_and_eps(self, output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor):
        """The clean sample and the noise that the model output implies at timestep t."""
        alpha_bar = _per_sample(self.alphas_cumprod, t, sample.ndim)
        a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
        output, sample = output.double(), sample.double()
        if self.prediction_type == "epsilon":
            return (sample - s * output) / a, output
        # v-prediction: v = a * eps - s * x0
        return a * sample - s * output, a * output + s * sample

    def consistency(self, output: torch.Tensor, t: torch.Tensor, sample: torch.Tensor):
        """f(x, t) = c_skip x + c_out x0: the clean estimate the consistency model outputs."""
        c_skip, c_out = self.boundary(t, sample.ndim)
        x0, _ = self.x0_and_eps(output, t, sample)
        return (c_skip * sample.double() + c_out * x0).to(output.dtype)

    def previous(self, t: torch.Tensor) -> torch.Tensor:
        """The grid point one solver step below t (0 below the first)."""
        return (t - self.skip).clamp(min=0)

    def ddim_step(self, x0: torch.Tensor, eps: torch.Tensor, t_prev: torch.Tensor) -> torch.Tensor:
        """Deterministic DDIM from (x0, eps) to t_prev."""
        alpha_prev = _per_sample(self.alphas_cumprod, t_prev, x0.ndim)
        return alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps


def draw(
    shape: tuple[int, ...],
    solver: ConsistencySolver,
    config: DistillConfig,
    gens,
    offset: float,
    shared: float = 0.0,
):
    """Each sample's noise (with the teacher's noise prior), grid timestep and guidance scale,
    from its own generator."""
    noise = sample_noise(shape, gens, offset, shared)
    index = torch.stack([torch.randint(solver.solver_steps, (), generator=g) for g in gens])
    lo, hi = config.guidance_scale
    w = torch.stack(
        [lo + (hi - lo) * torch.rand((), generator=g, dtype=torch.float64) for g in gens]
    )
    return noise, solver.timesteps[index], w


Teacher = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def guided_step(
    teacher: Teacher, solver: ConsistencySolver, noisy: torch.Tensor, t: torch.Tensor, w
) -> torch.Tensor:
    """One DDIM step of the teacher's classifier-free-guided ODE from t to `previous(t)`.
    `teacher(x, t)` -> its outputs with the captions and with the empty prompt."""
    conditional, unconditional = teacher(noisy, t)
    x0_c, eps_c = solver.x0_and_eps(conditional, t, noisy)
    x0_u, eps_u = solver.x0_and_eps(unconditional, t, noisy)
    w = w.view(-1, *([1] * (noisy.ndim - 1))).to(noisy.device)
    x0 = x0_u + w * (x0_c - x0_u)
    eps = eps_u + w * (eps_c - eps_u)
    return solver.ddim_step(x0, eps, solver.previous(t)).to(noisy.dtype)


def consistency_loss(
    student: Predict,
    teacher: Teacher,
    target: Predict,
    latents: torch.Tensor,
    scheduler,
    solver: ConsistencySolver,
    config: DistillConfig,
    generators: list[torch.Generator],
    offset_noise: float = 0.0,
    shared_noise: float = 0.0,
) -> torch.Tensor:
    """The consistency-distillation loss of one batch (module docstring), mean over samples.
    The teacher and target run first (no gradient), the student last."""
    device = latents.device
    noise, t, w = draw(tuple(latents.shape), solver, config, generators, offset_noise, shared_noise)
    noise, t = noise.to(device), t.to(device)
    noisy = scheduler.add_noise(latents, noise, t)
    with torch.no_grad():
        x_prev = guided_step(teacher, solver, noisy, t, w)
        t_prev = solver.previous(t)
        goal = solver.consistency(target(x_prev, t_prev), t_prev, x_prev)
    estimate = solver.consistency(student(noisy, t), t, noisy)
    diff = (estimate.float() - goal.float()).flatten(1)
    if config.loss == "huber":
        per_sample = ((diff**2 + config.huber_c**2).sqrt() - config.huber_c).mean(1)
    else:
        per_sample = (diff**2).mean(1)
    return per_sample.mean()
