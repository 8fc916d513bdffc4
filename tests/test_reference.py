"""Proof against the official AnimateDiff implementation, on the tiny reference files.

`expected.safetensors` holds what the official code (guoyww/AnimateDiff e92bd56) computes for
these weights: UNet noise predictions for v1/v2/v3 in fp32 and float64, and whole-pipeline videos.
Tolerances follow the README: fp32 noise is ~1e-6 of the largest magnitude for the UNet and
~5e-6 for the videos; a different computation is off by 1e-3 or more.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel

from animatediff import AnimationPipeline, MotionUNet
from animatediff.checkpoints.io import load_state_dict
from animatediff.checkpoints.motion import load_motion_module
from animatediff.motion.module import sinusoidal_encoding

VERSIONS = ("v1", "v2", "v3")
PIPELINE_CASES = ("v1_plain", "v2_motionlora", "v3_adapter_personal", "v2_personal_kohya")


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|, in float64."""
    reference = reference.double()
    return ((actual.double() - reference).abs().max() / reference.abs().max()).item()


@pytest.fixture(scope="module")
def unet2d(ref_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(ref_dir / "base", subfolder="unet").eval()


@pytest.fixture(scope="module")
def unet_inputs(expected):
    return (
        expected["unet.sample"],
        expected["unet.timestep"],
        expected["unet.encoder_hidden_states"],
    )


@torch.no_grad()
def run_motion_unet(unet, motion, sample, timestep, text) -> torch.Tensor:
    """Insert `motion` into `unet`, run once, take it out again."""
    model = MotionUNet(unet, motion)
    try:
        return model(sample, timestep, text)
    finally:
        model.remove()


@pytest.fixture(scope="module")
def fp32_outputs(unet2d, unet_inputs, ref_dir) -> dict[str, torch.Tensor]:
    """This project's fp32 noise prediction for each version, computed once."""
    return {
        v: run_motion_unet(unet2d, load_motion_module(ref_dir / f"mm_{v}.ckpt"), *unet_inputs)
        for v in VERSIONS
    }


# -------------------------------------------------------------------------- UNet noise prediction


@pytest.mark.parametrize("version", VERSIONS)
def test_unet_fp32_matches_official(version, fp32_outputs, expected):
    out = fp32_outputs[version]
    assert out.shape == expected[f"unet.out64.{version}"].shape
    assert out.dtype == torch.float32
    # against the exact (float64) result and against the official fp32 output
    assert rel_err(out, expected[f"unet.out64.{version}"]) < 1e-5
    assert rel_err(out, expected[f"unet.out.{version}"]) < 1e-5


@pytest.mark.parametrize("version", VERSIONS)
def test_unet_float64_matches_exact_result(version, ref_dir, expected, unet_inputs):
    unet = UNet2DConditionModel.from_pretrained(
        ref_dir / "base", subfolder="unet", torch_dtype=torch.float64
    ).eval()
    motion = load_motion_module(ref_dir / f"mm_{version}.ckpt", dtype=torch.float64)
    sample, timestep, text = (t.double() for t in unet_inputs)
    out = run_motion_unet(unet, motion, sample, timestep, text)
    assert out.dtype == torch.float64
    assert rel_err(out, expected[f"unet.out64.{version}"]) < 1e-10


@pytest.mark.parametrize("version", VERSIONS)
def test_pipeline_unet_matches_official(version, ref_dir, expected, unet_inputs):
    pipe = AnimationPipeline.load(
        base=ref_dir / "base", motion_module=ref_dir / f"mm_{version}.ckpt"
    )
    assert pipe.unet.config.version == version
    with torch.no_grad():
        out = pipe.unet(*unet_inputs)
    assert rel_err(out, expected[f"unet.out64.{version}"]) < 1e-5


def test_v1_groupnorm_across_frames_is_a_property_of_the_module(
    ref_dir, unet2d, unet_inputs, fp32_outputs, expected
):
    """v1 loaded as v3 keeps every weight but normalises per frame: a different computation."""
    v1 = load_motion_module(ref_dir / "mm_v1.ckpt")
    per_frame = load_motion_module(ref_dir / "mm_v1.ckpt", version="v3")
    assert v1.config.groupnorm_across_frames is True
    assert per_frame.config.groupnorm_across_frames is False
    a, b = v1.state_dict(), per_frame.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = run_motion_unet(unet2d, per_frame, *unet_inputs)
    reference = expected["unet.out64.v1"]
    assert rel_err(fp32_outputs["v1"], reference) < 1e-5
    assert rel_err(out, reference) > 1e-3


# ------------------------------------------------------------------------ positional encoding


@pytest.mark.parametrize("version, length", [("v1", 24), ("v2", 32), ("v3", 32)])
def test_stored_pe_buffers_are_the_sinusoid(version, length, ref_dir):
    raw = torch.load(ref_dir / f"mm_{version}.ckpt", map_location="cpu", weights_only=True)
    buffers = {k: v for k, v in raw.items() if k.endswith(".pos_encoder.pe")}
    assert len(buffers) == (42 if version == "v2" else 40)
    for key, pe in buffers.items():
        assert pe.shape[:2] == (1, length), key
        ours = sinusoidal_encoding(length, pe.shape[-1])
        # At the file's precision: the fp32 files hold the official fp32 computation (angles up
        # to 31 rad, whose fp32 spacing is 1.9e-6, so ~1e-6 from exact); the fp16 file must hold
        # exactly the rounded values.
        diff = (pe[0].double() - ours.to(pe.dtype).double()).abs().max().item()
        assert diff < (2e-6 if pe.dtype == torch.float32 else 1e-12), (key, diff)


def test_frames_beyond_stored_pe_length(ref_dir, unet2d, expected):
    """v1 stores a 24-frame encoding; 40 frames still run (the encoding is computed).
    (8x8 latents keep this fast; no comparison with the reference is made here.)"""
    motion = load_motion_module(ref_dir / "mm_v1.ckpt")
    assert motion.config.max_frames == 24
    g = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 40, 8, 8, generator=g)
    text = expected["unet.encoder_hidden_states"][:1]
    out = run_motion_unet(unet2d, motion, sample, 500, text)
    assert out.shape == (1, 4, 40, 8, 8)
    assert torch.isfinite(out).all()
    # the motion modules ran: per-frame 2D prediction of the same frames differs
    with torch.no_grad():
        flat = sample.transpose(1, 2).reshape(40, 4, 8, 8)
        image_only = unet2d(flat, 500, text.expand(40, -1, -1)).sample
    image_only = image_only.view(1, 40, 4, 8, 8).transpose(1, 2)
    assert rel_err(out, image_only) > 1e-3


# ---------------------------------------------------------------------------- whole pipeline


@pytest.mark.parametrize("case", PIPELINE_CASES)
def test_pipeline_video_matches_official(case, load_case, generate, expected):
    pipe = load_case(case)
    video = generate(pipe)
    reference = expected[f"pipe.video.{case}"]
    assert video.shape == reference.shape == (1, 3, 16, 128, 128)
    diff = (video - reference).abs().max().item()
    assert diff < 1e-4, f"{case}: max abs diff {diff:.3g}"


def test_reference_motion_files_load_safely(ref_dir):
    """The official files are plain dicts of tensors that the project's loader reads as-is."""
    for version in VERSIONS:
        path = ref_dir / f"mm_{version}.ckpt"
        ours = load_state_dict(path)
        raw = torch.load(path, map_location="cpu", weights_only=True)
        assert ours.keys() == raw.keys()
        assert all(torch.equal(ours[k], raw[k]) for k in raw)
