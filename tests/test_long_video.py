"""Long videos through the pipeline: context windows, views, prompt travel, FreeNoise, FreeInit,
motion scale (on the built-in model)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from animatediff import AnimationPipeline
from animatediff.options import Options

FAST = dict(num_inference_steps=2, progress=False, seed=1)


@pytest.fixture(scope="module")
def pipe():
    return AnimationPipeline.load()


def frames_seen(pipe, **kwargs) -> list[int]:
    """The frame counts the UNet was called with during one generation."""
    seen = []
    handle = pipe.unet.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[2]))
    try:
        pipe("a red circle", **FAST, **kwargs)
    finally:
        handle.remove()
    return seen


def test_short_clip_is_the_plain_pipeline(pipe):
    windowed = pipe("a red circle", num_frames=16, context_length=16, **FAST).frames
    plain = pipe("a red circle", num_frames=16, context_length=None, **FAST).frames
    assert torch.equal(windowed, plain)
    shorter = pipe("a red circle", num_frames=10, context_schedule="looped", **FAST).frames
    assert torch.equal(
        shorter, pipe("a red circle", num_frames=10, context_length=None, **FAST).frames
    )


@pytest.mark.parametrize("schedule", ["static", "uniform", "looped", "batched"])
def test_windows_bound_what_the_unet_sees(pipe, schedule):
    seen = frames_seen(pipe, num_frames=40, context_length=16, context_schedule=schedule)
    assert max(seen) == 16 and len(seen) >= 2 * 3  # >= 3 windows at each of 2 steps


def test_views_run_image_layers_on_all_frames(pipe):
    seen = frames_seen(pipe, num_frames=24, context_views=True)
    assert seen == [24, 24]
    views = pipe("a red circle", num_frames=24, context_views=True, **FAST).frames
    windows = pipe("a red circle", num_frames=24, **FAST).frames
    assert views.shape == windows.shape and (views - windows).abs().max() > 1e-3


def test_prompt_travel_embeddings(pipe):
    keys = {0: "a red circle", 8: "a blue square", -1: "a green star"}
    options = Options.build(dict(num_frames=12, num_videos_per_prompt=2))
    text = pipe.text(keys, "", options, guided=True)
    assert text.shape == (2 * 2 * 12, 77, pipe.text_encoder.config.hidden_size)
    cond = text[2 * 12 :].view(2, 12, 77, -1)
    from animatediff.pipeline.prompt import encode_prompts

    red, blue, green = encode_prompts(pipe.tokenizer, pipe.text_encoder, list(keys.values()))
    assert torch.equal(cond[0, 0], red) and torch.equal(cond[1, 8], blue)
    assert torch.equal(cond[0, 11], green)
    assert torch.allclose(cond[0, 4], (red + blue) / 2, atol=1e-6)
    assert torch.equal(cond[0], cond[1])  # every video follows the same script
    video = pipe(keys, num_frames=12, **FAST)
    assert video.frames.shape[2] == 12


@pytest.mark.slow  # seven generations, three of 24 frames, two with a FreeInit pass
def test_freenoise_and_freeinit_off_is_plain_on_changes(pipe):
    plain = pipe("a red circle", num_frames=24, **FAST).frames
    assert torch.equal(pipe("a red circle", num_frames=24, freenoise=False, **FAST).frames, plain)
    freenoise = pipe("a red circle", num_frames=24, freenoise=True, **FAST).frames
    assert (freenoise - plain).abs().max() > 1e-2
    short = pipe("a red circle", num_frames=8, **FAST).frames
    assert torch.equal(
        pipe("a red circle", num_frames=8, freeinit_iterations=0, **FAST).frames, short
    )
    again = pipe("a red circle", num_frames=8, freeinit_iterations=1, **FAST).frames
    assert (again - short).abs().max() > 1e-2
    assert torch.equal(
        pipe("a red circle", num_frames=8, freeinit_iterations=1, **FAST).frames, again
    )


def test_motion_scale(pipe):
    base = pipe("a red circle", num_frames=8, **FAST).frames
    per_frame_ones = pipe("a red circle", num_frames=8, motion_scale=[1.0] * 8, **FAST).frames
    assert torch.equal(base, per_frame_ones)
    off = pipe("a red circle", num_frames=8, motion_scale=0.0, **FAST).frames
    assert (off - base).abs().max() > 1e-2
    # Scale 0 removes the motion modules' effect: the same as the image model frame by frame.
    pipe.unet.motion.requires_grad_(False)
    saved = {k: v.clone() for k, v in pipe.unet.motion.state_dict().items()}
    try:
        for _, module in pipe.unet.motion.named_temporal_modules():
            torch.nn.init.zeros_(module.temporal_transformer.proj_out.weight)
            torch.nn.init.zeros_(module.temporal_transformer.proj_out.bias)
        zeroed = pipe("a red circle", num_frames=8, **FAST).frames
    finally:
        pipe.unet.motion.load_state_dict(saved)
    assert (zeroed - off).abs().max() < 1e-5


PEAK = """
import gc, json, sys, torch
from animatediff import AnimationPipeline
from animatediff.options import Options

def high_water_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

pipe = AnimationPipeline.load()
gc.collect()
# Reset the kernel's peak-RSS mark so loading's high-water mark does not hide the sampling's.
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = high_water_kib()
pipe("a red circle", num_frames=int(sys.argv[1]), height=128, width=128, num_inference_steps=1,
     guidance_scale=1.0, progress=False, seed=0, output_type="latents",
     context_length=None if sys.argv[2] == "none" else 16)
print(json.dumps({"peak_kib": max(high_water_kib() - before, 1)}))
"""


def _peak(frames: int, context: str, env) -> int:
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(frames), context],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]


@pytest.mark.slow  # three processes
@pytest.mark.skipif(
    not os.path.exists("/proc/self/clear_refs"), reason="needs Linux peak-RSS reset"
)
def test_peak_memory_is_bounded_by_the_window():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # The allocator's high-water mark varies by tens of MiB from run to run (upwards only): the
    # least of two runs of each.
    sixteen = min(_peak(16, "16", env) for _ in range(2))
    windowed = min(_peak(64, "16", env) for _ in range(2))
    whole = _peak(64, "none", env)
    print({"16": sixteen, "64 windowed": windowed, "64 whole": whole})
    assert windowed <= 1.5 * sixteen, (sixteen, windowed)
    # The measurement can tell them apart: all 64 frames at once cost about three times as much.
    assert whole > 2 * sixteen, (sixteen, whole)


def test_motion_scale_is_per_call(pipe):
    """The motion scale is an argument of the UNet's call, not state left on the model: a call
    with scale 0 changes nothing for the next call, and scale 0 is the image model alone."""
    torch.manual_seed(0)
    x = torch.randn(1, 4, 6, 16, 16)
    text = pipe.encode(["a red circle"])
    t = torch.tensor(500)
    before = pipe.unet(x, t, text)
    off = pipe.unet(x, t, text, motion_scale=0.0)
    assert torch.equal(pipe.unet(x, t, text), before)
    assert (off - before).abs().max() > 1e-3
    frames = pipe.unet.unet(x.transpose(1, 2).flatten(0, 1), t, text.repeat(6, 1, 1)).sample
    assert torch.allclose(off, frames.view(1, 6, 4, 16, 16).transpose(1, 2), atol=1e-5)
