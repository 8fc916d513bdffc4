"""Stable Diffusion 1.5 image models: a diffusers folder (or hub id), a single-file LDM checkpoint
(as community sites distribute personalised models), a separate VAE file."""

from __future__ import annotations

import json
import pickle
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint
from transformers import CLIPTextModel, CLIPTokenizer

from ..schedule import ANIMATEDIFF_SCHEDULE
from .io import CheckpointError, check_keys, first_keys, load_state_dict
from .sd_folder import check_base_folder

LDM_UNET = "model.diffusion_model."
LDM_VAE = "first_stage_model."
LDM_TEXT = "cond_stage_model.transformer."
_SDXL_MARKERS = ("conditioner.embedders.", "model.diffusion_model.label_emb.")


@dataclass
class ImageModel:
    """The frozen text-to-image parts of a Stable Diffusion 1.5 model."""

    tokenizer: CLIPTokenizer
    text_encoder: CLIPTextModel
    vae: AutoencoderKL
    unet: UNet2DConditionModel
    source: str  # where the base configs came from: a folder or a hub id


# What loading a part of a folder raises when the folder, not the program, is at fault.
_LOAD_ERRORS = (OSError, ValueError, KeyError, TypeError, RuntimeError, pickle.UnpicklingError)


def load_base(base: str | Path, dtype: torch.dtype = torch.float32) -> ImageModel:
    """A diffusers SD1.5 folder, or a hub id (downloaded once when online). A folder is checked
    first (`sd_folder.check_base_folder`); pickled weights load only if they are plain tensors."""
    base = str(base)
    if Path(base).exists():
        check_base_folder(base)
        for part in ("unet", "vae", "text_encoder"):
            check_pickled_weights(Path(base) / part)
    elif base.startswith((".", "/")) or base.count("/") != 1:
        raise FileNotFoundError(f"base model not found: {base} (a diffusers folder or a hub id)")
    kw = dict(torch_dtype=dtype)
    return ImageModel(
        tokenizer=_part(CLIPTokenizer, base, "tokenizer"),
        text_encoder=_part(CLIPTextModel, base, "text_encoder", **kw),
        vae=_part(AutoencoderKL, base, "vae", **kw),
        unet=_part(UNet2DConditionModel, base, "unet", **kw),
        source=base,
    )


def _part(cls, base: str, part: str, **kw):
    try:
        return cls.from_pretrained(base, subfolder=part, **kw)
    except _LOAD_ERRORS as e:
        where = Path(base) / part if Path(base).exists() else f"{base} ({part})"
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(where, f"cannot be loaded: {message}") from e


def check_pickled_weights(folder: str | Path) -> None:
    """A model folder whose only weights are pickles (`.bin`, `.pt`): read them with the safe
    loader first, which refuses code with a clear message (diffusers' and transformers'
    loaders refuse it too, with a message that names neither the file nor the reason)."""
    folder = Path(folder)
    if not folder.is_dir():
        return
    files = list(folder.iterdir())
    if any(f.suffix == ".safetensors" for f in files):
        return
    for file in files:
        if file.suffix in (".bin", ".pt", ".pth", ".ckpt"):
            load_state_dict(file)


def _split(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if k.startswith(prefix)}


def load_single_file(model: ImageModel, path: str | Path) -> list[str]:
    """Replace UNet, VAE and text encoder with those in an LDM-layout checkpoint, converted with
    diffusers' single-file conversion; the base supplies configs and tokenizer, so this works
    offline. Returns the parts replaced (a file without a VAE keeps the base VAE)."""
    sd = load_state_dict(path)
    if any(k.startswith(_SDXL_MARKERS) for k in sd):
        raise CheckpointError(path, "an SDXL checkpoint; this tool animates SD1.5 models")
    unet_sd = _split(sd, LDM_UNET)
    if not unet_sd:
        raise CheckpointError(
            path, f"not a single-file SD checkpoint (no '{LDM_UNET}*' keys; found {first_keys(sd)})"
        )
    replaced = ["unet"]
    model.unet = _convert(UNet2DConditionModel, model, sd, path, "unet")
    if _split(sd, LDM_VAE):
        model.vae = _convert(AutoencoderKL, model, _split(sd, LDM_VAE), path, "vae")
        replaced.append("vae")
    if _split(sd, LDM_TEXT):
        model.text_encoder = _convert_clip(model.text_encoder, sd, path)
        replaced.append("text_encoder")
    return replaced


def _convert(cls, model: ImageModel, sd, path, part: str):
    current = getattr(model, part)
    try:
        new = cls.from_single_file(
            sd,
            config=model.source,
            subfolder=part,
            torch_dtype=current.dtype,
            local_files_only=Path(model.source).exists(),
        )
    except (KeyError, RuntimeError, ValueError) as e:
        raise CheckpointError(path, f"{part} does not fit an SD1.5 model ({e})") from e
    check_keys(path, current.state_dict(), new.state_dict(), f"the base model's {part}")
    return new.to(current.device)


def _convert_clip(text_encoder: CLIPTextModel, sd, path) -> CLIPTextModel:
    # `position_ids` is a buffer some exports carry and others do not; it is not a weight.
    converted = {
        k: v for k, v in convert_ldm_clip_checkpoint(sd).items() if "position_ids" not in k
    }
    expected = {k: v for k, v in text_encoder.state_dict().items() if "position_ids" not in k}
    if not any(k.startswith("text_model.") for k in expected):  # transformers >= 5 naming
        converted = {k.removeprefix("text_model."): v for k, v in converted.items()}
    check_keys(path, expected, converted, "an SD1.5 CLIP text encoder")
    new = CLIPTextModel(text_encoder.config)
    new.load_state_dict(converted, strict=False)
    return new.to(device=text_encoder.device, dtype=text_encoder.dtype)


def load_vae_file(model: ImageModel, path: str | Path) -> None:
    """A separate VAE: LDM layout (`first_stage_model.` or bare `encoder.`/`decoder.` keys) or
    diffusers layout."""
    sd = load_state_dict(path)
    if any(k.startswith(LDM_VAE) for k in sd):
        sd = {k[len(LDM_VAE) :]: v for k, v in sd.items() if k.startswith(LDM_VAE)}
    expected = model.vae.state_dict()
    if set(sd) != set(expected):  # LDM names: convert through diffusers
        sd = {LDM_VAE + k: v for k, v in sd.items()}
        model.vae = _convert(AutoencoderKL, model, sd, path, "vae")
        return
    check_keys(path, expected, sd, "an SD1.5 VAE")
    model.vae.load_state_dict(sd)


def save_base_folder(folder: str | Path, model: ImageModel) -> Path:
    """Write `model` as a diffusers SD1.5 folder (every part, AnimateDiff's DDIM scheduler and
    `model_index.json`), the layout `load_base` and diffusers' pipelines read."""
    folder = Path(folder)
    for name in ("tokenizer", "text_encoder", "vae", "unet"):
        getattr(model, name).save_pretrained(folder / name)
    save_pipeline_files(folder)
    return folder


def save_pipeline_files(folder: str | Path) -> None:
    """AnimateDiff's DDIM scheduler and the `model_index.json` that make a folder of SD1.5
    parts (tokenizer, text_encoder, vae, unet) a diffusers folder."""
    folder = Path(folder)
    DDIMScheduler(**ANIMATEDIFF_SCHEDULE).save_pretrained(folder / "scheduler")
    index = {
        "_class_name": "StableDiffusionPipeline",
        "scheduler": ["diffusers", "DDIMScheduler"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
    }
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def save_diffusers_folder(
    single_file: str | Path, base: str | Path, output: str | Path, overwrite: bool = False
) -> Path:
    """Convert a single-file checkpoint into a diffusers SD1.5 folder (configs and tokenizer
    from `base`), written under a temporary name and renamed into place."""
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists (use --overwrite)")
    model = load_base(base)
    load_single_file(model, single_file)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
    try:
        save_base_folder(tmp, model)
        if output.exists():
            shutil.rmtree(output)
        tmp.rename(output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output
