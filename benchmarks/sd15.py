"""Stable Diffusion 1.5's architecture with random weights, built in code on any device (the GPU
benchmark builds it on the GPU from a seed; the memory estimate on the meta device), and the
same models as this project's pipeline and as diffusers' `AnimateDiffPipeline`."""

from __future__ import annotations

from pathlib import Path

import nopyav  # noqa: F401  (before animatediff)
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from animatediff.checkpoints.base import ImageModel
from animatediff.motion import MotionModuleConfig, MotionModules, MotionUNet
from animatediff.pipeline import AnimationPipeline

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "tests" / "data" / "official_tiny" / "base" / "tokenizer"

UNET = dict(
    sample_size=64,
    in_channels=4,
    out_channels=4,
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    block_out_channels=(320, 640, 1280, 1280),
    layers_per_block=2,
    cross_attention_dim=768,
    attention_head_dim=8,
    norm_num_groups=32,
)
VAE = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    latent_channels=4,
    sample_size=512,
    scaling_factor=0.18215,
)
TEXT = dict(
    vocab_size=49408,
    hidden_size=768,
    intermediate_size=3072,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=77,
    hidden_act="quick_gelu",
    projection_dim=768,
)


# The same layout with few channels, for checking the benchmarks on a CPU.
MINI = dict(
    unet=dict(block_out_channels=(32, 64, 128, 128), cross_attention_dim=64, norm_num_groups=8),
    vae=dict(block_out_channels=(32, 64, 64, 64), norm_num_groups=8),
    text=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
              projection_dim=64),
    motion=dict(block_out_channels=(32, 64, 128, 128), norm_num_groups=8),
)  # fmt: skip


def tokenizer() -> CLIPTokenizer:
    """The tiny test tokenizer (its ids are a subset of SD1.5's 49,408)."""
    return CLIPTokenizer.from_pretrained(TOKENIZER)


def build(
    device: str | torch.device,
    dtype: torch.dtype,
    seed: int = 0,
    version: str = "v2",
    arch: str = "sd15",
):
    """(ImageModel, MotionModules) with SD1.5's shapes (`arch="mini"`: few channels), made on
    `device` from `seed` (the same numbers on the same kind of device every time); the motion
    modules' output projections random (not zero), so they act."""
    small = MINI if arch == "mini" else dict(unet={}, vae={}, text={}, motion={})
    torch.manual_seed(seed)
    tok = tokenizer()
    text_cfg = CLIPTextConfig(
        **{**TEXT, **small["text"]},
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    with torch.device(device):
        unet = UNet2DConditionModel(**{**UNET, **small["unet"]})
        vae = AutoencoderKL(**{**VAE, **small["vae"]})
        text = CLIPTextModel(text_cfg)
        motion = MotionModules(MotionModuleConfig.preset(version, **small["motion"]))
    if torch.device(device).type != "meta":
        with torch.no_grad():
            for _, module in motion.named_temporal_modules():
                proj = module.temporal_transformer.proj_out
                torch.nn.init.normal_(proj.weight, std=0.02)
                torch.nn.init.normal_(proj.bias, std=0.02)
    for m in (unet, vae, text, motion):
        m.to(dtype=dtype).eval().requires_grad_(False)
    return ImageModel(tok, text, vae, unet, source=f"{arch}-random"), motion


def ours(image: ImageModel, motion: MotionModules) -> AnimationPipeline:
    """This project's pipeline on the built models (shared, not copied)."""
    return AnimationPipeline(image, MotionUNet(image.unet, motion))


def weight_bytes(*modules: torch.nn.Module) -> int:
    seen, total = set(), 0
    for module in modules:
        for t in (*module.parameters(), *module.buffers()):
            if id(t) not in seen:
                seen.add(id(t))
                total += t.numel() * t.element_size()
    return total
