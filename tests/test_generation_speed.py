"""The pipeline's memory and speed behaviour, each against the plain result: offloading, a
denoising loop that never waits for the device, control conditions computed once, MotionLoRAs
merged for a generation, text shared across frames, and the opt-in approximations (DeepCache,
guidance on a subset of steps) with their measured difference."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from diffusers import ControlNetModel
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import animatediff.pipeline.pipeline as pipeline_module
from animatediff import AnimationPipeline
from animatediff.builtin import motion_lora
from animatediff.cli.main import main
from animatediff.control.controlnet import controlnet_forward, embed
from animatediff.motion.unet import SharedTextAttention
from animatediff.options import ModelOptions, OptionError, Options
from animatediff.pipeline.offload import Offload

PROMPT = "a red circle moving on a blue background"


def latents(frames: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, frames, 16, 16, generator=torch.Generator().manual_seed(seed))


def run(pipe, frames=6, steps=3, **kw):
    kw = dict(num_frames=frames, num_inference_steps=steps, progress=False, **kw)
    return pipe(PROMPT, latents=latents(frames), **kw).frames


@pytest.fixture(scope="module")
def pipe():
    return AnimationPipeline.load()


# -- offloading -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_offload_gives_the_same_video(pipe, mode):
    offloaded = AnimationPipeline.load(offload=mode)
    assert offloaded.offload.mode == mode
    assert torch.equal(run(offloaded), run(pipe))


class Placed(torch.nn.Linear):
    """A layer that records where it is sent (this machine has one device)."""

    def __init__(self):
        super().__init__(2, 2)
        self.at = "cpu"

    def to(self, device):
        self.at = torch.device(device).type
        return self


def test_offload_keeps_one_group_on_the_device():
    text, vae, unet, shared = (Placed() for _ in range(4))
    groups = {"text": [text, shared], "vae": [vae], "unet": [unet, shared]}
    offload = Offload("model", "cuda", groups)
    where = lambda: [m.at for m in (text, vae, unet, shared)]  # noqa: E731
    assert where() == ["cpu"] * 4
    offload.activate("text")
    assert where() == ["cuda", "cpu", "cpu", "cuda"]
    offload.activate("unet")
    assert where() == ["cpu", "cpu", "cuda", "cuda"]
    offload.activate("vae")
    assert where() == ["cpu", "cuda", "cpu", "cpu"]


def test_pipeline_moves_models_per_phase(monkeypatch):
    offloaded = AnimationPipeline.load(offload="model")
    seen = []
    original = Offload.activate
    monkeypatch.setattr(Offload, "activate", lambda self, g: (seen.append(g), original(self, g)))
    run(offloaded, frames=2, steps=1)
    assert seen == ["text", "unet", "vae"]


# -- no host synchronisation in the loop -----------------------------------------------------------
class HostReads(TorchDispatchMode):
    """Counts, once switched on, blocking copies from the host to the meta device: on a GPU
    each would wait for the device's queue. Reading a meta tensor's value raises by itself."""

    def __init__(self):
        super().__init__()
        self.on, self.copies = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on and func in (torch.ops.aten._to_copy.default, torch.ops.aten.copy_.default):
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            target = kwargs.get("device") or tensors[0].device
            source = tensors[-1] if func is torch.ops.aten.copy_.default else tensors[0]
            if source.device.type == "cpu" and torch.device(target).type == "meta":
                if not kwargs.get("non_blocking", False) and source.numel() > 1:
                    self.copies.append(str(func))
        return func(*args, **kwargs)


@pytest.fixture(scope="module")
def meta_pipe():
    """The built-in pipeline on the meta device: every value read on the host would raise."""
    return AnimationPipeline.load().to("meta")


SLOW = pytest.mark.slow  # many windows: 20-30 s on a shared 2-core CPU


@pytest.mark.parametrize(
    "settings",
    [
        pytest.param({}, id="plain"),
        pytest.param(
            dict(context_length=4, context_overlap=1, context_schedule="uniform", context_stride=2),
            id="uniform-windows",
            marks=SLOW,
        ),
        pytest.param(
            dict(context_length=4, context_overlap=2, context_schedule="looped"),
            id="looped",
            marks=SLOW,
        ),
        pytest.param(
            dict(context_length=4, context_overlap=2, context_views=True, motion_scale=[0.5] * 8),
            id="views",
        ),
        pytest.param(
            dict(motion_scale=0.7, guidance_end=0.5, deepcache_interval=2), id="approximations"
        ),
        pytest.param(dict(scheduler="euler_a"), id="euler_a"),
        pytest.param(dict(scheduler="dpmpp_2m_karras"), id="dpmpp"),
    ],
)
def test_denoising_loop_never_waits_for_the_device(meta_pipe, settings):
    reads = HostReads()
    kw = dict(num_frames=8, num_inference_steps=3, progress=False, output_type="latents")

    def after_step(done, total):
        reads.on = True  # from the second step on (the first prepares the loop's tensors)

    with reads:
        out = meta_pipe(PROMPT, latents=torch.zeros(1, 4, 8, 16, 16), callback=after_step,
                        **kw, **settings)  # fmt: skip
    assert out.device.type == "meta" and reads.copies == []


# -- conditions computed once ----------------------------------------------------------------------
def test_sparsectrl_condition_is_embedded_once(load_case, expected):
    pipe = load_case("v3_sparsectrl_rgb")
    calls = []
    embedding = pipe.sparsectrl.net.unet.controlnet_cond_embedding
    embedding.register_forward_hook(lambda *a: calls.append(1))
    images = expected["sparsectrl.rgb.images"]
    pipe("a cat", num_frames=8, num_inference_steps=3, width=128, height=128, seed=0,
         control_images=images, control_frames=[0], progress=False)  # fmt: skip
    assert len(calls) == 1


def test_controlnet_condition_is_embedded_once():
    cn_pipe = AnimationPipeline.load()
    net = ControlNetModel.from_unet(  # two downsamplings: the built-in VAE's factor, 4
        cn_pipe.unet.unet, conditioning_embedding_out_channels=(16, 32, 96)
    ).eval()
    cn_pipe.controlnets = [net]
    calls = []
    net.controlnet_cond_embedding.register_forward_hook(lambda *a: calls.append(1))
    images = torch.rand(1, 3, 6, 64, 64)
    run(cn_pipe, controlnet_images=images, context_length=4, context_overlap=2)
    assert len(calls) == 1  # 3 steps x 2 windows, one embedding of all 6 frames


def test_controlnet_forward_matches_diffusers(pipe):
    torch.manual_seed(0)
    net = ControlNetModel.from_unet(pipe.unet.unet, load_weights_from_unet=True).eval()
    with torch.no_grad():
        for block in net.controlnet_down_blocks:
            torch.nn.init.normal_(block.weight, std=0.1)
    x, cond = torch.randn(6, 4, 16, 16), torch.rand(6, 3, 128, 128)  # its embedding: 1/8
    text, t = torch.randn(6, 77, pipe.unet.unet.config.cross_attention_dim), torch.tensor(400)
    with torch.no_grad():
        down, mid = net(x, t, text, controlnet_cond=cond, conditioning_scale=0.7, return_dict=False)
        ours = controlnet_forward(net, x, t, text, embed(net, cond), 0.7)
    for a, b in zip(ours.down, down, strict=True):
        assert torch.allclose(a, b, atol=1e-6)
    assert torch.allclose(ours.mid, mid, atol=1e-6)


# -- merged MotionLoRA, text shared by frames --------------------------------------------------------
def test_merged_motion_lora_matches_hooked(monkeypatch):
    lora_pipe = AnimationPipeline.load(motion_loras=[(motion_lora("zoom-in"), 0.8)])
    lora = next(iter(lora_pipe.motion_loras.values()))
    weights = {k: v.clone() for k, v in lora_pipe.unet.motion.state_dict().items()}
    merged = run(lora_pipe)
    assert lora.attached  # hooks back after the generation, weights restored exactly
    for k, v in lora_pipe.unet.motion.state_dict().items():
        assert torch.equal(v, weights[k]), k
    monkeypatch.setattr(pipeline_module, "lora_merged", lambda sets: contextlib.nullcontext())
    hooked = run(lora_pipe)
    assert (merged - hooked).abs().max() < 5e-5  # rounding: merged weights vs added outputs
    assert (merged - run(AnimationPipeline.load())).abs().max() > 1e-3  # the LoRA acts


def test_shared_text_attention_matches_per_frame_text(pipe):
    unet = pipe.unet
    x = torch.randn(2, 4, 5, 16, 16)
    text = torch.randn(2, 77, unet.unet.config.cross_attention_dim)
    per_frame = text.repeat_interleave(5, 0)  # one row per frame: wrapped processors pass it on
    assert all(isinstance(m.processor, SharedTextAttention) for m in unet._cross)
    with torch.no_grad():
        shared, frames = unet(x, 300, text), unet(x, 300, per_frame)
    assert torch.allclose(shared, frames, atol=1e-5)


# -- opt-in approximations ---------------------------------------------------------------------------
def test_guidance_on_a_subset_of_steps(pipe):
    rows = []
    hook = pipe.unet.register_forward_pre_hook(lambda m, args: rows.append(args[0].shape[0]))
    try:
        exact = run(pipe, steps=4)
        assert torch.equal(run(pipe, steps=4, guidance_start=0.0, guidance_end=1.0), exact)
        rows.clear()
        cut = run(pipe, steps=4, guidance_end=0.5)
        assert rows == [2, 2, 1, 1]  # the unconditional pass skipped in the last half
        rows.clear()
        run(pipe, steps=4, guidance_start=0.25)
        assert rows == [1, 2, 2, 2]
    finally:
        hook.remove()
    assert 0 < (cut - exact).abs().mean() < 0.2


def test_deepcache_runs_the_deep_blocks_every_n_steps(pipe):
    """At the CLI's 25 steps (DeepCache is an approximation for many steps: at a handful,
    the cached deep features are too stale on the built-in model)."""
    calls = []
    deep = pipe.unet.unet.mid_block.resnets[0]
    hook = deep.register_forward_hook(lambda *a: calls.append(1))
    try:
        exact = run(pipe, frames=2, steps=25)
        assert torch.equal(run(pipe, frames=2, steps=25, deepcache_interval=1), exact)
        calls.clear()
        cached = run(pipe, frames=2, steps=25, deepcache_interval=3)
    finally:
        hook.remove()
    assert len(calls) == 9  # full passes at steps 0, 3, ..., 24; the shallow branch between
    assert 0 < (cached - exact).abs().mean() < 0.2


# -- options and the command line ---------------------------------------------------------------------
def test_performance_options_are_checked():
    opts = Options.build(dict(ff_chunks=4, vae_tiling="on", deepcache_interval=3))
    assert (opts.performance.ff_chunks, opts.performance.deepcache_interval) == (4, 3)
    with pytest.raises(OptionError, match="guidance_start"):
        Options.build(dict(guidance_start=0.8, guidance_end=0.5))
    with pytest.raises(OptionError, match="offload"):
        ModelOptions(offload="disk")
    with pytest.raises(OptionError, match="compile"):
        ModelOptions(compile="max")


def test_cli_passes_load_and_call_settings(tmp_path):
    out = tmp_path / "v.gif"
    flags = ["--offload", "model", "--fuse-qkv", "--ff-chunks", "2", "--vae-tiling", "off"]
    flags += ["--deepcache-interval", "2", "--guidance-end", "0.5"]
    assert 0 == main(["generate", PROMPT, "--steps", "2", "--frames", "4", *flags, "-o", str(out)])
    settings = json.loads((tmp_path / "v.gif.json").read_text())
    assert settings["models"]["offload"] == "model" and settings["models"]["fuse_qkv"] is True
    perf = settings["performance"]
    assert (perf["ff_chunks"], perf["deepcache_interval"], perf["guidance_end"]) == (2, 2, 0.5)
