"""Every sampler of `AnimationPipeline` against diffusers' own sampling loop.

The reference is the loop diffusers' pipelines run (`set_timesteps`, `init_noise_sigma`,
`scale_model_input`, classifier-free guidance, `step` with the generator), written here with
diffusers' public scheduler API, on schedulers configured independently of the package: the
official AnimateDiff inference configs' `noise_scheduler_kwargs` plus each sampler's own
settings. Same UNet (`pipe.unet`), same text embeddings (plain CLIP, as diffusers encodes them),
same seeded noise: the pipeline's latents must equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
)

from animatediff import AnimationPipeline
from animatediff.pipeline import SCHEDULERS

PROMPT = "a red circle moving on a blue background"
NEGATIVE = "worst quality, low quality"
FRAMES, SIZE, STEPS, GUIDANCE, SEED = 4, 64, 4, 7.5, 11

# configs/inference/inference-v2.yaml (and v3) of the official repository: the training schedule.
OFFICIAL = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="linear",
    steps_offset=1,
)
DPMPP_2M = dict(algorithm_type="dpmsolver++", solver_order=2)  # A1111's "DPM++ 2M"
REFERENCE = {
    "ddim": lambda: DDIMScheduler(**OFFICIAL, clip_sample=False),
    "euler": lambda: EulerDiscreteScheduler(**OFFICIAL),
    "euler_a": lambda: EulerAncestralDiscreteScheduler(**OFFICIAL),
    "dpmpp_2m": lambda: DPMSolverMultistepScheduler(**OFFICIAL, **DPMPP_2M),
    "dpmpp_2m_karras": lambda: DPMSolverMultistepScheduler(
        **OFFICIAL, **DPMPP_2M, use_karras_sigmas=True
    ),
    "lcm": lambda: LCMScheduler(**OFFICIAL, clip_sample=False),
}


@pytest.fixture(scope="module")
def pipe() -> AnimationPipeline:
    return AnimationPipeline.load()


@torch.no_grad()
def diffusers_loop(pipe: AnimationPipeline, scheduler) -> torch.Tensor:
    """diffusers' text-to-video sampling loop (as in its AnimateDiffPipeline), on `pipe.unet`."""
    ids = pipe.tokenizer(
        [NEGATIVE, PROMPT],
        padding="max_length",
        max_length=pipe.tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    text = pipe.text_encoder(ids)[0]  # rows: [unconditional; conditional]
    generator = torch.Generator().manual_seed(SEED)
    size = SIZE // pipe.vae_scale_factor
    shape = (1, 4, FRAMES, size, size)  # SD1.5 latents have 4 channels
    latents = torch.randn(shape, generator=generator) * scheduler.init_noise_sigma
    scheduler.set_timesteps(STEPS)
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([latents] * 2), t)
        uncond, cond = pipe.unet(model_input, t, text).chunk(2)
        noise = uncond + GUIDANCE * (cond - uncond)
        latents = scheduler.step(noise, t, latents, generator=generator).prev_sample
    return latents


def test_every_scheduler_has_a_reference():
    assert sorted(REFERENCE) == sorted(SCHEDULERS)


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_matches_diffusers_loop(pipe, name):
    expected = diffusers_loop(pipe, REFERENCE[name]())
    latents = pipe(
        PROMPT,
        NEGATIVE,
        scheduler=name,
        seed=SEED,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        output_type="latents",
        progress=False,
        shared_noise=0.0,  # the reference loop draws plain noise, not the module's prior
    )
    assert latents.shape == expected.shape
    torch.testing.assert_close(latents, expected, rtol=1e-5, atol=1e-5)
    # The samplers really differ: the reference of DDIM is not what e.g. Euler gives.
    if name != "ddim":
        assert (expected - diffusers_loop(pipe, REFERENCE["ddim"]())).abs().max() > 1e-2
