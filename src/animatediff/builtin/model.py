"""The default model: the shipped one, or a tiny SD1.5-architecture model with random weights
built in code from a fixed seed and cached (for source trees without the data, and for tests
that need some model but not a trained one)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ..checkpoints.base import ImageModel, save_base_folder
from ..checkpoints.motion import save_motion_module
from ..motion import MotionModuleConfig, MotionModules
from . import SEED, BuiltinModel, cache_dir, shipped, write_word_tokenizer


def resolve(base, motion_module=None) -> tuple:
    """`(base, motion_module)` with the built-in model filled in where `base` is None (its
    motion module too, unless one is given): the one rule the pipeline and trainer share."""
    if base is not None:
        return base, motion_module
    model = builtin_model()
    return model.base, model.motion_module if motion_module is None else motion_module


def builtin_model() -> BuiltinModel:
    """Paths of the default model: the shipped trained one if present, else the random one."""
    return shipped() or random_model()


def random_model() -> BuiltinModel:
    """The tiny random model, built in code (seeded) and cached, whatever ships: for tests that
    need some SD1.5-architecture model but not a trained one."""
    target = cache_dir()
    if not (target / "motion_module.safetensors").exists():
        _build_atomically(target)
    return BuiltinModel(target / "base", target / "motion_module.safetensors", False)


def _build_atomically(target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".building-", dir=target.parent))
    try:
        build_random_model(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "motion_module.safetensors").exists():
                raise
            shutil.rmtree(tmp)  # another process built it meanwhile
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


TINY_TEXT = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=77,
    projection_dim=32,
)


def random_text_encoder(tokenizer, **config) -> CLIPTextModel:
    """A CLIP text encoder with random weights for a word tokenizer: 2 layers, 32 wide
    (`TINY_TEXT`), or as `config` (`CLIPTextConfig` fields) says."""
    return CLIPTextModel(
        CLIPTextConfig(
            **{**TINY_TEXT, **config},
            vocab_size=len(tokenizer),
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=1,
        )
    )


def build_random_model(folder: Path) -> None:
    """A tiny SD1.5-architecture model folder plus a v3-layout motion module, seeded."""
    torch.manual_seed(SEED)
    write_word_tokenizer(folder / "base" / "tokenizer")
    tokenizer = CLIPTokenizer.from_pretrained(folder / "base" / "tokenizer")
    text_encoder = random_text_encoder(tokenizer)  # drawn first: the seeded weights stay the same
    channels = (32, 64, 64, 64)
    unet = UNet2DConditionModel(
        sample_size=16,
        block_out_channels=channels,
        layers_per_block=2,
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=32,
        down_block_types=(
            "DownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 64, 64),
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=64,
    )
    image = ImageModel(tokenizer, text_encoder, vae, unet, source="random")
    save_base_folder(folder / "base", image)
    config = MotionModuleConfig.preset("v3", block_out_channels=channels, zero_init=False)
    motion = MotionModules(config)
    with torch.no_grad():  # small random outputs so the motion modules visibly act
        for _, module in motion.named_temporal_modules():
            module.temporal_transformer.proj_out.weight.mul_(0.1)
    save_motion_module(motion, folder / "motion_module.safetensors")
