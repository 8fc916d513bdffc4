"""Sampling behaviour of AnimationPipeline on the built-in model (the shipped trained one, 64x64;
in a tree without it, the random one built in code). Each sampler's values are checked against
diffusers' own loop in test_schedulers.py."""

from __future__ import annotations

import warnings

import pytest
import safetensors.torch
import torch

from animatediff import AnimationPipeline
from animatediff.pipeline import SCHEDULERS, make_scheduler

PROMPT = "a red circle moving on a blue background"
FAST = dict(num_frames=6, num_inference_steps=2, progress=False)


@pytest.fixture(scope="module")
def pipe():
    return AnimationPipeline.load()


def test_default_size_and_layout(pipe):
    video = pipe(PROMPT, seed=0, **FAST)
    assert pipe.default_size == 64
    assert video.frames.shape == (1, 3, 6, 64, 64)
    assert video.frames.dtype == torch.float32
    assert 0 <= video.frames.min() and video.frames.max() <= 1
    assert video.info["sampling"]["seed"] == 0 and video.info["prompt"] == PROMPT


def test_seed_draws_official_noise_layout(pipe):
    """A seed means: one randn of shape (b, 4, f, h/8, w/8) from a generator seeded with it;
    with a mixed noise prior (`shared_noise`, the built-in module's default), one frame of
    common noise drawn after it from the same generator, mixed in."""
    g = torch.Generator().manual_seed(7)
    noise = torch.randn((1, 4, 6, 16, 16), generator=g)
    a = pipe(PROMPT, seed=7, shared_noise=0.0, **FAST).frames
    b = pipe(PROMPT, latents=noise, **FAST).frames
    c = pipe(PROMPT, seed=8, shared_noise=0.0, **FAST).frames
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.01  # another seed, another video
    common = torch.randn((1, 4, 1, 16, 16), generator=g)
    mixed = 0.5**0.5 * common + (1 - 0.5) ** 0.5 * noise
    prior = pipe(PROMPT, seed=7, shared_noise=0.5, **FAST).frames
    assert torch.equal(prior, pipe(PROMPT, latents=mixed, **FAST).frames)


def test_batch_equals_separate_runs(pipe):
    prompts = [PROMPT, "a green square turning on a white background"]
    latents = torch.randn((4, 4, 6, 16, 16), generator=torch.Generator().manual_seed(1))
    batch = pipe(prompts, latents=latents, num_videos_per_prompt=2, **FAST).frames
    assert batch.shape[0] == 4
    for i in range(4):
        alone = pipe(prompts[i // 2], latents=latents[i : i + 1], **FAST).frames
        assert (batch[i] - alone[0]).abs().max() < 1e-4


@pytest.mark.parametrize("guidance_scale", [7.5, 1.0])
def test_batch_of_prompts_equals_separate_runs_guided_or_not(pipe, guidance_scale):
    """Without guidance the UNet sees the conditional rows only: each video keeps its own text."""
    prompts = [PROMPT, "a green square turning on a white background"]
    latents = torch.randn((2, 4, 2, 16, 16), generator=torch.Generator().manual_seed(2))
    run = dict(FAST, num_frames=2, guidance_scale=guidance_scale)
    batch = pipe(prompts, latents=latents, **run).frames
    for i, prompt in enumerate(prompts):
        alone = pipe(prompt, latents=latents[i : i + 1], **run).frames
        assert (batch[i] - alone[0]).abs().max() < 1e-4


def test_decode_chunk_size_does_not_change_result(pipe):
    latents = torch.randn((1, 4, 6, 16, 16), generator=torch.Generator().manual_seed(2))
    a = pipe(PROMPT, latents=latents, decode_chunk_size=1, **FAST).frames
    b = pipe(PROMPT, latents=latents, decode_chunk_size=16, **FAST).frames
    assert (a - b).abs().max() < 1e-4  # float noise of batch-size-dependent kernels only


def test_guidance_uses_negative_prompt(pipe):
    a = pipe(PROMPT, negative_prompt="worst quality", seed=3, **FAST).frames
    b = pipe(PROMPT, negative_prompt="", seed=3, **FAST).frames
    c = pipe(PROMPT, negative_prompt="worst quality", guidance_scale=1.0, seed=3, **FAST).frames
    d = pipe(PROMPT, negative_prompt="", guidance_scale=1.0, seed=3, **FAST).frames
    assert (a - b).abs().mean() > 1e-3  # the negative prompt counts (values: test_schedulers.py)
    assert torch.equal(c, d)  # no guidance: the negative prompt is unused


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_scheduler_is_recorded(pipe, name):
    video = pipe(PROMPT, seed=0, scheduler=name, **{**FAST, "num_inference_steps": 1})
    assert video.info["sampling"]["scheduler"] == name


def test_default_schedule_is_animatediff_linear():
    s = make_scheduler()
    assert type(s).__name__ == "DDIMScheduler"
    cfg = s.config
    assert (cfg.beta_schedule, cfg.beta_start, cfg.beta_end) == ("linear", 0.00085, 0.012)
    assert cfg.steps_offset == 1 and cfg.clip_sample is False
    s.set_timesteps(3)
    assert s.timesteps.tolist() == [667, 334, 1]
    with pytest.raises(ValueError, match="unknown scheduler"):
        make_scheduler("nope")


def test_long_prompt_is_encoded_whole_in_chunks(pipe):
    """A prompt over 75 tokens is not cut: it is encoded in chunks of 77 (A1111's rule), the
    negative prompt padded to the same length, with no warning; its end changes the video."""
    long_prompt = " ".join(["red circle"] * 60)  # 120 words: 2 chunks
    assert pipe.encode([long_prompt, ""]).shape[1] == 2 * 77
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run = dict(seed=0, num_frames=2, num_inference_steps=1, progress=False)
        video = pipe(long_prompt + ", blue square", **run).frames
    assert (video - pipe(long_prompt + ", green star", **run).frames).abs().max() > 1e-3


def test_bad_sizes_are_rejected(pipe):
    with pytest.raises(ValueError, match="multiple of 8"):
        pipe(PROMPT, height=60, width=64, **FAST)
    with pytest.raises(ValueError, match="latents must have shape"):
        pipe(PROMPT, latents=torch.zeros(1, 4, 5, 16, 16), **FAST)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    pipe = AnimationPipeline.load(dtype=dtype)
    assert pipe.unet.dtype == dtype and pipe.text_encoder.dtype == dtype
    # The VAE takes the model's dtype (in fp16 an overflowing chunk is decoded again in fp32).
    assert pipe.vae.dtype == dtype
    ref = AnimationPipeline.load()
    latents = torch.randn((1, 4, 4, 16, 16), generator=torch.Generator().manual_seed(0))
    kw = dict(num_frames=4, num_inference_steps=2, progress=False, latents=latents)
    half, full = pipe(PROMPT, **kw).frames, ref(PROMPT, **kw).frames
    assert (half - full).abs().mean() < 0.05


def test_seeded_ancestral_sampler_repeats(pipe):
    a = pipe(PROMPT, seed=4, scheduler="euler_a", **FAST).frames
    b = pipe(PROMPT, seed=4, scheduler="euler_a", **FAST).frames
    assert torch.equal(a, b)


def test_prompt_travel_takes_weights_and_embeddings(tmp_path):
    """A prompt map holding one weighted prompt with an embedding at every key is exactly that
    prompt without travel; the embedding and the weights do change the video."""
    width = AnimationPipeline.load().text_encoder.config.hidden_size
    vectors = torch.randn(2, width, generator=torch.Generator().manual_seed(0)) * 3
    safetensors.torch.save_file({"emb_params": vectors}, tmp_path / "circle.safetensors")
    pipe = AnimationPipeline.load(embeddings=[tmp_path / "circle.safetensors"])
    prompt = "a (red:1.4) circle on a [blue] background"
    run = dict(FAST, seed=4)
    still = pipe(prompt, **run).frames
    assert torch.allclose(pipe({0: prompt, 4: prompt}, **run).frames, still, atol=1e-5)
    plain = AnimationPipeline.load()
    assert (plain(prompt, **run).frames - still).abs().max() > 1e-3  # the embedding counts
    unweighted = pipe("a red circle on a blue background", **run).frames
    assert (unweighted - still).abs().max() > 1e-3  # and so do the weights
