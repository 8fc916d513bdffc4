"""Lossless speed and memory switches, each against the eager / whole / unfused result: one
compiled graph per UNet call, regional compilation, fused q/k/v, feed-forward and position
chunking, channels-last, and the VAE in chunks, tiles and half precision."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel

from animatediff import AnimationPipeline
from animatediff.lora import LoRASet, merged
from animatediff.motion import MotionModuleConfig, MotionModules, MotionUNet
from animatediff.motion.module import TemporalModule
from animatediff.pipeline import speed
from animatediff.vae import (
    BUDGET,
    decode_chunk,
    decode_latents,
    encode_frames,
    frames_per_call,
    uses_tiles,
)

PROMPT = "a red circle moving on a blue background"


def mini_unet(version: str = "v2", seed: int = 0) -> MotionUNet:
    """A two-level SD1.5-layout UNet with motion modules (non-zero outputs): seconds to trace."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        block_out_channels=(8, 16),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    config = MotionModuleConfig.preset(
        version, block_out_channels=(8, 16), layers_per_block=1, num_attention_heads=2,
        norm_num_groups=4,
    )  # fmt: skip
    motion = MotionModules(config)
    with torch.no_grad():
        for _, m in motion.named_temporal_modules():
            torch.nn.init.normal_(m.temporal_transformer.proj_out.weight, std=0.3)
    return MotionUNet(unet, motion).eval()


def inputs(frames: int = 4, batch: int = 2):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 4, frames, 8, 8, generator=g)
    return x, torch.tensor(500), torch.randn(batch, 7, 8, generator=g)


class CountingBackend:
    """A torch.compile backend that runs the traced graph as it is and counts compilations."""

    def __init__(self):
        self.graphs = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1
        return gm.forward


# -- one graph per UNet call (tracing takes 5-30 s a case on a shared 2-core CPU) -------------------
@pytest.mark.parametrize(
    "case",
    ["plain"] + [pytest.param(c, marks=pytest.mark.slow) for c in ("views", "frame_scale",
                                                                    "deep_feature", "v1")],
)  # fmt: skip
def test_forward_traces_as_one_graph_without_breaks(case):
    unet = mini_unet("v1" if case == "v1" else "v2")
    x, t, text = inputs()
    kwargs = {}
    if case == "views":
        w = torch.ones(3)
        kwargs["windows"] = [([0, 1, 2], w), ([1, 2, 3], w)]
    if case == "frame_scale":
        kwargs["motion_scale"] = torch.tensor([0.0, 0.5, 1.0, 2.0])
    if case == "deep_feature":
        with torch.no_grad():
            _, feature = unet(x, t, text, return_deep_feature=True)
        kwargs["deep_feature"] = feature
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(x, t, text, **kwargs)
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained.break_reasons


def test_full_compile_matches_eager_and_motion_scale_tensors_do_not_recompile():
    torch._dynamo.reset()
    unet = mini_unet()
    x, t, text = inputs()
    backend = CountingBackend()
    with torch.no_grad():
        eager = [unet(x, t, text, motion_scale=torch.tensor(s)) for s in (0.5, 0.8)]
        speed.compile_unet(unet, "full", backend=backend)
        compiled = [unet(x, t, text, motion_scale=torch.tensor(s)) for s in (0.5, 0.8)]
    assert backend.graphs == 1  # the scale is an input of the graph, not a constant
    for a, b in zip(eager, compiled):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_regional_compile_reuses_graphs_across_blocks():
    torch._dynamo.reset()
    unet = mini_unet()
    x, t, text = inputs()
    backend = CountingBackend()
    with torch.no_grad():
        eager = unet(x, t, text)
        speed.compile_unet(unet, "regional", backend=backend)
        compiled = unet(x, t, text)
        unet(x, t, text)
    blocks = sum(type(m).__name__ in speed.REPEATED for m in unet.modules())
    assert 0 < backend.graphs < blocks  # instances of one shape share a graph
    assert torch.allclose(eager, compiled, atol=1e-6)


@pytest.mark.slow
def test_inductor_full_compile_matches_eager():
    torch._dynamo.reset()
    unet = mini_unet()
    x, t, text = inputs()
    with torch.no_grad():
        eager = unet(x, t, text, motion_scale=0.7)
        speed.compile_unet(unet, "full")
        compiled = unet(x, t, text, motion_scale=0.7)
    assert (eager - compiled).abs().max() < 1e-4


# -- fused projections ------------------------------------------------------------------------------
def test_fused_qkv_matches_and_keeps_the_state_dict():
    unet = mini_unet()
    x, t, text = inputs()
    motion_keys = list(unet.motion.state_dict())
    with torch.no_grad():
        plain = unet(x, t, text)
        speed.fuse_projections(unet)
        fused = unet(x, t, text)
        unet.to(torch.float64)  # casting refuses the fused weights from the new ones
        wide = unet(x.double(), t, text.double())
    assert list(unet.motion.state_dict()) == motion_keys
    attention = unet.motion.down_blocks[0].motion_modules[0].temporal_transformer
    attention = attention.transformer_blocks[0].attention_blocks[0]
    assert attention.qkv is not None and attention.qkv.dtype == torch.float64
    assert attention.to_q.weight.data_ptr() == attention.qkv.data_ptr()  # a view, no copy
    assert torch.allclose(plain, fused, atol=1e-5)
    assert torch.allclose(plain.double(), wide, atol=1e-5)


def test_fused_qkv_sees_merged_lora_and_runs_hooked_lora():
    unet = mini_unet()
    unet.motion.fuse_projections()
    x, t, text = inputs()
    targets = [n for n, _ in unet.motion.named_modules() if n.endswith(("to_q", "to_v"))]
    lora = LoRASet.create(unet.motion, targets, rank=2)
    with torch.no_grad():
        for layer in lora.layers.values():
            torch.nn.init.normal_(layer.up.weight, std=0.5)
        base = unet(x, t, text)
        lora.attach(unet.motion)
        hooked = unet(x, t, text)  # hooks present: the projections run one by one
        with merged([lora]):
            merged_out = unet(x, t, text)  # merged into the shared fused weight
        after = unet(x, t, text)
    assert (hooked - base).abs().max() > 1e-3
    assert torch.allclose(hooked, merged_out, atol=1e-5)
    assert torch.equal(hooked, after)


# -- chunking ---------------------------------------------------------------------------------------
def test_feed_forward_chunking_is_exact():
    unet = mini_unet()
    x, t, text = inputs()
    with torch.no_grad():
        whole = unet(x, t, text)
        unet.set_ff_chunking(2)  # 8 images per call: 4 pieces
        chunked = unet(x, t, text)
        with pytest.raises(ValueError, match="do not divide a batch of 8"):
            unet.set_ff_chunking(3)
            unet(x, t, text)
        unet.set_ff_chunking(None)
        again = unet(x, t, text)
    assert torch.allclose(whole, chunked, atol=1e-6)
    assert torch.equal(whole, again)


def test_motion_module_position_chunks_are_exact():
    config = MotionModuleConfig.preset("v3", block_out_channels=(16,), norm_num_groups=4)
    module = TemporalModule(16, config.replace(zero_init=False)).eval()
    x = torch.randn(2 * 5, 16, 3, 3)
    with torch.no_grad():
        whole = module(x, 5)
        for chunks in (2, 3, 18, 100):
            assert torch.allclose(module(x, 5, chunks), whole, atol=1e-6), chunks


def test_ff_chunk_rows_fit_the_budget_and_divide_the_batch():
    # SD1.5 at 512x512, 16 frames, guidance: 32 images of 4096 tokens, GEGLU 2560 wide, fp16
    rows = speed.ff_chunk_rows(32, 16, 4096, 2560, 2)
    assert rows is not None and 16 % rows == 0
    assert rows * 4096 * 2560 * 2 * 2 <= speed.FF_BUDGET
    assert speed.ff_chunk_rows(32, 16, 256, 256, 4) is None  # small: one piece
    assert speed.ff_chunk_rows(30, 15, 256, 256, 4, chunks=4) == 5  # 15 = 3 x 5
    assert speed.ff_chunk_rows(32, 16, 256, 256, 4, chunks=1) is None


def test_channels_last_matches_and_motion_modules_keep_the_layout():
    unet = mini_unet()
    x, t, text = inputs()
    module = unet.motion.down_blocks[0].motion_modules[0]
    h = torch.randn(8, 8, 4, 4).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        plain = unet(x, t, text)
        speed.channels_last(unet)
        fast = unet(x, t, text)
        out = module(h, 4)
        ref = module(h.contiguous(), 4)
    assert torch.allclose(plain, fast, atol=1e-5)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert torch.allclose(out, ref, atol=1e-6)


# -- the VAE ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin():
    return AnimationPipeline.load()


def latents_for(pipe, frames=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, 4, frames, size, size, generator=g)


def test_chunked_decode_equals_whole(builtin):
    z = latents_for(builtin, frames=5)
    whole = decode_latents(builtin.vae, z, chunk_size=16)
    for chunk in (1, 2):
        # float noise of batch-size-dependent kernels only
        assert torch.allclose(decode_latents(builtin.vae, z, chunk_size=chunk), whole, atol=1e-4)


def test_vae_calls_are_sized_to_the_budget():
    with torch.device("meta"):
        sd15 = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        ).half()
    assert frames_per_call(sd15, 512, 512) == 1  # ~384 MiB a frame in fp16 (memory.py)
    assert frames_per_call(sd15, 128, 128) == BUDGET // (3 * 256 * 128 * 128 * 2)
    assert not uses_tiles(sd15, 96, 96)  # 768 px: whole
    assert uses_tiles(sd15, 72, 128)  # 1024 x 576: tiles
    assert not uses_tiles(sd15, 72, 128, "off") and uses_tiles(sd15, 8, 8, "on")
    with pytest.raises(ValueError, match="tiling"):
        uses_tiles(sd15, 8, 8, "sometimes")


def test_inputs_move_to_the_vae_device(builtin):
    """Cast and moved: a VAE on another device (here the meta device) gets its inputs there."""
    vae = AutoencoderKL.from_config(builtin.vae.config).to("meta")
    assert decode_chunk(vae, torch.zeros(2, 4, 16, 16)).device.type == "meta"
    assert encode_frames(vae, torch.zeros(1, 3, 2, 64, 64)).device.type == "meta"


def test_tiled_decode_differs_little():
    """Tiles blended where they overlap (diffusers' tiled decoding): an approximation, as the
    mid block's attention sees one tile. Tiles a third of the frame (SD1.5: 512 px tiles of a
    1024 x 576 frame), on the built-in VAE: measured mean 0.033, max 0.24 of [0, 1] pixels."""
    pipe = AnimationPipeline.load()
    vae = pipe.vae
    vae.tile_latent_min_size, vae.tile_sample_min_size = 32, 128
    z = latents_for(pipe, frames=1, size=48)
    whole = decode_latents(vae, z, tiling="off")
    tiled = decode_latents(vae, z, tiling="on")
    assert whole.shape == tiled.shape
    assert 1e-3 < (whole - tiled).abs().mean() < 0.05


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_decode_is_close_to_fp32(builtin, dtype):
    z = builtin(PROMPT, num_frames=4, num_inference_steps=3, seed=0, progress=False,
                output_type="latents")  # fmt: skip
    full = decode_latents(builtin.vae, z)
    vae = AutoencoderKL.from_config(builtin.vae.config)
    vae.load_state_dict(builtin.vae.state_dict())
    half = decode_latents(vae.to(dtype), z)
    error = (half - full).abs()
    # measured: bf16 max 1.5e-2, mean 2.0e-3; fp16 max 1.7e-3, mean 2.1e-4 (of [0, 1] pixels)
    assert error.max() < (0.03 if dtype == torch.bfloat16 else 0.005)
    assert error.mean() < (0.004 if dtype == torch.bfloat16 else 0.0005)


def test_fp16_overflow_is_decoded_again_in_fp32(builtin):
    vae = AutoencoderKL.from_config(builtin.vae.config)
    vae.load_state_dict(builtin.vae.state_dict())
    with torch.no_grad():  # activations beyond fp16's 65504 in an up block, fine in fp32
        vae.decoder.up_blocks[0].resnets[0].conv1.weight.mul_(3e4)
    z = latents_for(builtin, frames=2)
    full = decode_latents(vae, z)
    vae.half()
    with torch.no_grad():
        raw = vae.decode(z[:, :, 0].half() / vae.config.scaling_factor).sample
    assert not torch.isfinite(raw).all()  # fp16 alone overflows
    half = decode_latents(vae, z)
    assert torch.isfinite(half).all()
    assert (half - full).abs().max() < 1e-3  # fp32 on fp16-rounded weights
    assert vae.dtype == torch.float16  # cast back afterwards
