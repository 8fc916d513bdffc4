"""Read LoRA files against the model they modify: every target checked before anything changes,
so a file that does not fit leaves the model untouched."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import nn

from ..lora import LoRAPair, merge_lora
from .base import ImageModel
from .io import CheckpointError, first_keys, load_state_dict
from .lora import is_kohya, parse_attention_lora, parse_kohya_lora


def check_targets(model: nn.Module, pairs: Mapping[str, LoRAPair], path, what: str) -> None:
    """Every target exists, has a weight, and the LoRA's shape fits it."""
    modules = dict(model.named_modules())
    missing = [p for p in pairs if not hasattr(modules.get(p), "weight")]
    if missing:
        raise CheckpointError(
            path, f"{what} targets layers this model lacks: {first_keys(missing)}"
        )
    misfit = []
    for target, pair in pairs.items():
        try:
            pair.check_fits(modules[target].weight.shape)
        except ValueError as e:
            misfit.append(f"{target} ({e})")
    if misfit:
        raise CheckpointError(path, f"{what} does not fit this model: {first_keys(misfit)}")


# The weights file of a LoRA folder: diffusers' MotionLoRA converter and the Hub's
# `animatediff-motion-lora-*` repos use the first name, diffusers' LoRA savers the second.
LORA_FOLDER_FILES = (
    "diffusion_pytorch_model.safetensors",
    "pytorch_lora_weights.safetensors",
    "diffusion_pytorch_model.bin",
    "pytorch_lora_weights.bin",
)


def lora_file(path: str | Path) -> Path:
    """A LoRA file, or the weights file of a folder holding one (as diffusers writes them)."""
    path = Path(path)
    if not path.is_dir():
        return path
    for name in LORA_FOLDER_FILES:
        if (path / name).is_file():
            return path / name
    raise CheckpointError(
        path, f"a folder without a LoRA weights file ({', '.join(LORA_FOLDER_FILES[:2])})"
    )


def attention_lora_pairs(model: nn.Module, path: str | Path, what: str) -> dict[str, LoRAPair]:
    """An official/diffusers-format LoRA (MotionLoRA, domain adapter), checked against `model`;
    `path` may be a file or a folder holding one."""
    path = lora_file(path)
    pairs = parse_attention_lora(load_state_dict(path), str(path))
    check_targets(model, pairs, path, what)
    return pairs


def apply_image_lora(image: ImageModel, path: str | Path, strength: float, scaling: str) -> None:
    """Merge an image LoRA (kohya, or diffusers attention format; a file or a folder holding
    one) into UNet and text encoder."""
    path = lora_file(path)
    sd = load_state_dict(path)
    if is_kohya(sd):
        unet_pairs, text_pairs = parse_kohya_lora(
            sd, str(path), image.unet, image.text_encoder, scaling
        )
    else:
        unet_pairs, text_pairs = parse_attention_lora(sd, str(path)), {}
    check_targets(image.unet, unet_pairs, path, "LoRA")
    check_targets(image.text_encoder, text_pairs, path, "LoRA")
    merge_lora(image.unet, unet_pairs, strength)
    merge_lora(image.text_encoder, text_pairs, strength)
