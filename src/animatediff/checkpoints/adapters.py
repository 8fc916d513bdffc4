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
            pair.delta(modules[target].weight.shape)
        except ValueError as e:
            misfit.append(f"{target} ({e})")
    if misfit:
        raise CheckpointError(path, f"{what} does not fit this model: {first_keys(misfit)}")


def attention_lora_pairs(model: nn.Module, path: str | Path, what: str) -> dict[str, LoRAPair]:
    """An official/diffusers-format LoRA (MotionLoRA, domain adapter), checked against `model`."""
    pairs = parse_attention_lora(load_state_dict(path), str(path))
    check_targets(model, pairs, path, what)
    return pairs


def apply_image_lora(image: ImageModel, path: str | Path, strength: float, scaling: str) -> None:
    """Merge an image LoRA (kohya, or diffusers attention format) into UNet and text encoder."""
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
