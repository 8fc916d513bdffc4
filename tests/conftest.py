"""Shared fixtures: the official reference files (tests/data/official_tiny) and the pipeline cases
that `expected.safetensors` holds the official outputs of (see that folder's README.md)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch

REF_DIR = Path(__file__).parent / "data" / "official_tiny"

# The models here are tiny: one intra-op thread is nearly as fast as two on an idle machine, and
# far faster on a busy one (OpenMP threads spin-waiting on shared cores made a pipeline run 4x
# slower in measurements). ANIMATEDIFF_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("ANIMATEDIFF_TEST_THREADS", "1")))

# The whole-pipeline settings of the reference cases (README: "Whole pipeline").
PROMPT = "a boy playing guitar, best quality"
NEGATIVE_PROMPT = "worst quality, low quality"
NUM_FRAMES = 16
SIZE = 128
STEPS = 3
GUIDANCE = 7.5


def pipeline_case_kwargs(name: str, ref_dir: Path = REF_DIR) -> dict:
    """`AnimationPipeline.load` arguments of one reference case, exactly as the README says."""
    cases = {
        "v1_plain": dict(motion_module=ref_dir / "mm_v1.ckpt"),
        "v2_motionlora": dict(
            motion_module=ref_dir / "mm_v2.ckpt",
            motion_loras=[(ref_dir / "motion_lora_v2.ckpt", 0.7)],
        ),
        "v3_adapter_personal": dict(
            personal=ref_dir / "personal_ldm.safetensors",
            motion_module=ref_dir / "mm_v3.ckpt",
            adapter=(ref_dir / "domain_adapter_v3.ckpt", 1.0),
        ),
        "v2_personal_kohya": dict(
            personal=ref_dir / "personal_ldm.safetensors",
            motion_module=ref_dir / "mm_v2.ckpt",
            loras=[(ref_dir / "kohya_lora.safetensors", 0.8)],
        ),
        **{
            f"v3_sparsectrl_{kind}": dict(
                motion_module=ref_dir / "mm_v3.ckpt",
                adapter=(ref_dir / "domain_adapter_v3.ckpt", 1.0),
                sparsectrl=ref_dir / f"sparsectrl_{kind}.ckpt",
            )
            for kind in ("rgb", "scribble")
        },
    }
    return dict(base=ref_dir / "base", **cases[name])


@pytest.fixture(scope="session")
def ref_dir() -> Path:
    assert (REF_DIR / "expected.safetensors").is_file(), f"reference files missing in {REF_DIR}"
    return REF_DIR


@pytest.fixture(scope="session")
def expected(ref_dir: Path) -> dict[str, torch.Tensor]:
    """Inputs and official outputs (read-only by convention: clone before modifying)."""
    return safetensors.torch.load_file(ref_dir / "expected.safetensors")


@pytest.fixture(scope="session")
def load_case(ref_dir: Path) -> Callable:
    """`load_case(name, **overrides)` -> a fresh `AnimationPipeline` for a reference case."""
    from animatediff import AnimationPipeline

    def load(name: str, **overrides):
        return AnimationPipeline.load(**{**pipeline_case_kwargs(name, ref_dir), **overrides})

    return load


@pytest.fixture(scope="session")
def generate(expected: dict[str, torch.Tensor]) -> Callable:
    """`generate(pipe)` -> (1, 3, 16, 128, 128) video with the README's settings and latents."""

    def run(pipe) -> torch.Tensor:
        video = pipe(
            PROMPT,
            NEGATIVE_PROMPT,
            num_frames=NUM_FRAMES,
            height=SIZE,
            width=SIZE,
            num_inference_steps=STEPS,
            guidance_scale=GUIDANCE,
            latents=expected["pipe.latents"].clone(),
            progress=False,
        )
        return video.frames

    return run
