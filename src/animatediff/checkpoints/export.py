"""Writers for the files community sites distribute: one-file SD1.5 checkpoints in the original
LDM/CompVis layout, and kohya-format image LoRAs.

Both are inverses of the project's readers (`base.load_single_file`, which converts with
diffusers' single-file code, and `lora.parse_kohya_lora`). The LDM key map is derived from
diffusers' `convert_ldm_unet_checkpoint` / `convert_ldm_vae_checkpoint` and is checked against
them on every export, so a file is only written if diffusers reads every weight back in place.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)
from transformers import CLIPTextModel

from ..lora import LoRAPair
from .base import LDM_TEXT, LDM_UNET, LDM_VAE
from .io import StrPath, first_keys, load_state_dict, read_metadata, save_state_dict
from .lora import parse_attention_lora

__all__ = ["kohya_from_official", "ldm_state_dict", "save_kohya_lora", "save_single_file"]

Tensors = dict[str, torch.Tensor]

_UNET_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D")
_UNET_UP = ("UpBlock2D", "CrossAttnUpBlock2D")
# A mid block without attention would put its second resnet at `middle_block.1`, which
# diffusers always reads as an attention: only the cross-attention mid block round-trips.
_UNET_MID = ("UNetMidBlock2DCrossAttn",)
_VAE_DOWN = ("DownEncoderBlock2D",)
_VAE_UP = ("UpDecoderBlock2D",)

_UNET_TOP = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
# diffusers ResnetBlock2D children -> LDM ResBlock children (UNet) / ResnetBlock (VAE).
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2"}
_VAE_RESNET["conv_shortcut"] = "nin_shortcut"
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_VAE_TOP = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
_VAE_PART_TOP = {"conv_in": "conv_in", "conv_out": "conv_out", "conv_norm_out": "norm_out"}


# --------------------------------------------------------------------------------------------
# Single-file LDM checkpoints
# --------------------------------------------------------------------------------------------


def save_single_file(
    unet: UNet2DConditionModel,
    vae: AutoencoderKL,
    text_encoder: CLIPTextModel,
    path: StrPath,
    dtype: torch.dtype | None = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write UNet, VAE and CLIP text encoder as one LDM-layout checkpoint (`model.diffusion_model.*`,
    `first_stage_model.*`, `cond_stage_model.transformer.text_model.*`), floating-point weights
    cast to `dtype` (None keeps them); atomic, returns the path written."""
    sd = ldm_state_dict(unet, vae, text_encoder)
    if dtype is not None:
        sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    return save_state_dict(sd, path, metadata=metadata)


def ldm_state_dict(
    unet: UNet2DConditionModel, vae: AutoencoderKL, text_encoder: CLIPTextModel
) -> Tensors:
    """The three models' weights under LDM names (tensors shared with the models, not copied)."""
    for model, cls in ((unet, UNet2DConditionModel), (vae, AutoencoderKL)):
        if not isinstance(model, cls):
            raise TypeError(f"expected a diffusers {cls.__name__}, got {type(model).__name__}")
    if not isinstance(text_encoder, CLIPTextModel):  # e.g. ...WithProjection: not SD1.5's
        raise TypeError(f"expected a transformers CLIPTextModel, got {type(text_encoder).__name__}")
    return {**_unet_to_ldm(unet), **_vae_to_ldm(vae), **_clip_to_ldm(text_encoder)}


def _check_types(what: str, kind: str, found: list[str | None], allowed: tuple[str, ...]) -> None:
    bad = sorted({str(t) for t in found if t not in allowed})
    if bad:
        raise ValueError(
            f"{what} {kind} type {', '.join(bad)} has no SD1.5 LDM layout; supported: "
            f"{', '.join(allowed)}"
        )


def _unet_to_ldm(unet: UNet2DConditionModel) -> Tensors:
    cfg = unet.config
    _check_types("UNet", "down block", list(cfg.down_block_types), _UNET_DOWN)
    _check_types("UNet", "up block", list(cfg.up_block_types), _UNET_UP)
    _check_types("UNet", "mid block", [cfg.mid_block_type], _UNET_MID)
    if not isinstance(cfg.layers_per_block, int):  # SDXL-style per-block counts
        raise ValueError(f"UNet layers_per_block {cfg.layers_per_block!r}: SD1.5 uses one number")
    per = cfg.layers_per_block + 1  # LDM numbers resnets and the down/upsampler consecutively
    up_attn = [t.startswith("CrossAttn") for t in cfg.up_block_types]

    def name(module: str) -> str | None:
        if module in _UNET_TOP:
            return _UNET_TOP[module]
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", module):
            side, b, kind, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
            # input_blocks.0 is conv_in, so down blocks start at 1; output blocks at 0.
            block = (
                f"input_blocks.{per * b + j + 1}"
                if side == "down"
                else f"output_blocks.{per * b + j}"
            )
            return _resnet(f"{block}.0", rest) if kind == "resnets" else f"{block}.1.{rest}"
        if m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", module):
            return f"input_blocks.{per * (int(m[1]) + 1)}.0.op"
        if m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", module):
            b = int(m[1])  # after the last resnet, and after its attention if there is one
            return f"output_blocks.{per * b + per - 1}.{2 if up_attn[b] else 1}.conv"
        if m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(.+)", module):
            return _resnet(f"middle_block.{2 * int(m[1])}", m[2])
        if m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", module):
            return f"middle_block.1.{m[1]}"
        return None

    def _resnet(prefix: str, child: str) -> str | None:
        first, _, rest = child.partition(".")
        new = _UNET_RESNET.get(first)
        return None if new is None or rest else f"{prefix}.{new}"

    sd = unet.state_dict()
    ldm = _rename(sd, name, LDM_UNET, "UNet")
    _check_inverse(sd, convert_ldm_unet_checkpoint(ldm, dict(cfg)), "UNet")
    return ldm


def _vae_to_ldm(vae: AutoencoderKL) -> Tensors:
    cfg = vae.config
    _check_types("VAE", "down block", list(cfg.down_block_types), _VAE_DOWN)
    _check_types("VAE", "up block", list(cfg.up_block_types), _VAE_UP)
    n_up = len(cfg.up_block_types)

    def name(module: str) -> str | None:
        if module in _VAE_TOP:
            return _VAE_TOP[module]
        part, _, rest = module.partition(".")
        if part not in ("encoder", "decoder"):
            return None
        new = _VAE_PART_TOP.get(rest)
        if m := re.fullmatch(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(\w+)", rest):
            # LDM numbers decoder levels from the lowest resolution up, diffusers the reverse.
            i = int(m[2]) if m[1] == "down" else n_up - 1 - int(m[2])
            new = _child(f"{m[1]}.{i}.block.{m[3]}", _VAE_RESNET, m[4])
        elif m := re.fullmatch(r"down_blocks\.(\d+)\.downsamplers\.0\.conv", rest):
            new = f"down.{m[1]}.downsample.conv"
        elif m := re.fullmatch(r"up_blocks\.(\d+)\.upsamplers\.0\.conv", rest):
            new = f"up.{n_up - 1 - int(m[1])}.upsample.conv"
        elif m := re.fullmatch(r"mid_block\.resnets\.(\d+)\.(\w+)", rest):
            new = _child(f"mid.block_{int(m[1]) + 1}", _VAE_RESNET, m[2])
        elif m := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", rest):
            new = _child("mid.attn_1", _VAE_ATTN, m[1])
        return f"{part}.{new}" if new else None

    def _child(prefix: str, names: dict[str, str], child: str) -> str | None:
        return f"{prefix}.{names[child]}" if child in names else None

    sd = vae.state_dict()
    ldm = _rename(sd, name, LDM_VAE, "VAE")
    for key, value in ldm.items():
        # LDM's mid attention uses 1x1 convolutions where diffusers uses Linear layers.
        if re.search(r"\.mid\.attn_1\.(q|k|v|proj_out)\.weight$", key) and value.ndim == 2:
            ldm[key] = value[:, :, None, None]
    _check_inverse(sd, convert_ldm_vae_checkpoint(ldm, dict(cfg)), "VAE")
    return ldm


def _clip_to_ldm(text_encoder: CLIPTextModel) -> Tensors:
    # transformers >= 5 dropped the `text_model.` level that SD1.5 files have; `position_ids`
    # is a buffer, not a weight, and the loaders ignore it.
    return {
        LDM_TEXT + (k if k.startswith("text_model.") else f"text_model.{k}"): v
        for k, v in text_encoder.state_dict().items()
        if "position_ids" not in k
    }


def _rename(sd: Tensors, name: Callable[[str], str | None], prefix: str, what: str) -> Tensors:
    out, unmapped = {}, []
    for key, value in sd.items():
        module, _, param = key.rpartition(".")
        new = name(module)
        if new is None:
            unmapped.append(key)
        else:
            out[f"{prefix}{new}.{param}"] = value
    if unmapped:
        raise ValueError(f"{what} weights with no SD1.5 LDM equivalent: {first_keys(unmapped)}")
    return out


def _check_inverse(original: Tensors, read_back: Mapping[str, object], what: str) -> None:
    """diffusers' reader must put every tensor back under its own name: its index arithmetic
    and substring matching are the ground truth, so any configuration where this map and the
    reader disagree fails here instead of producing a file that loads wrong. Compared by
    storage address, so the check costs nothing."""

    def same(a: object, b: torch.Tensor) -> bool:
        return (
            isinstance(a, torch.Tensor) and a.data_ptr() == b.data_ptr() and a.numel() == b.numel()
        )

    wrong = [k for k, v in original.items() if not same(read_back.get(k), v)]
    wrong += [k for k in read_back if k not in original]
    if wrong:
        raise RuntimeError(
            f"{what}: diffusers would read the exported LDM file back wrongly for this block "
            f"configuration ({first_keys(wrong)})"
        )


# --------------------------------------------------------------------------------------------
# kohya image LoRAs
# --------------------------------------------------------------------------------------------


def save_kohya_lora(
    pairs: Mapping[str, LoRAPair],
    path: StrPath,
    alpha: float | None = None,
    metadata: dict[str, str] | None = None,
    *,
    text_pairs: Mapping[str, LoRAPair] | None = None,
) -> Path:
    """Write `{unet module path: LoRAPair}` (and optionally text-encoder pairs) as a kohya LoRA:
    `lora_unet_<path with _ for .>.lora_down.weight` / `.lora_up.weight` / `.alpha`.

    kohya readers scale by `alpha / rank`; `up` is rescaled so that the merged update stays
    `scale * up @ down` for any `alpha`. The default alpha = rank makes that factor 1, so
    readers that ignore `.alpha` (the official AnimateDiff code) agree with those that don't."""
    if alpha is not None and not alpha > 0:
        raise ValueError(f"{path}: alpha must be positive, got {alpha}")
    motion = [t for t in pairs if ".motion_modules." in t]
    if motion:  # image tools have no motion modules; MotionLoRA stays in the official format
        raise ValueError(
            f"{path}: kohya LoRAs are image LoRAs, but these layers are motion modules: "
            f"{first_keys(motion)}"
        )
    sd: Tensors = {}
    for prefix, group in (("lora_unet_", pairs), ("lora_te_", text_pairs or {})):
        for target, pair in group.items():
            if prefix == "lora_te_" and not target.startswith("text_model."):
                target = f"text_model.{target}"  # kohya names keep transformers 4's level
            name = prefix + target.replace(".", "_")
            if f"{name}.alpha" in sd:
                raise ValueError(f"{path}: two layers share the kohya name {name} ({target})")
            sd.update(_kohya_layer(name, pair, alpha, path))
    if not sd:
        raise ValueError(f"{path}: no LoRA layers to save")
    return save_state_dict(sd, path, metadata=metadata)


def _kohya_layer(name: str, pair: LoRAPair, alpha: float | None, path: StrPath) -> Tensors:
    rank = pair.rank
    if pair.down.ndim not in (2, 4) or pair.up.ndim != pair.down.ndim:
        raise ValueError(
            f"{path}: {name}: LoRA weights must be Linear (2-D) or Conv2d (4-D), got down "
            f"{tuple(pair.down.shape)} and up {tuple(pair.up.shape)}"
        )
    if pair.up.flatten(1).shape[1] != rank:
        raise ValueError(f"{path}: {name}: up {tuple(pair.up.shape)} does not have rank {rank}")
    a = float(rank if alpha is None else alpha)
    factor = pair.scale * rank / a
    up = pair.up if factor == 1 else pair.up * factor
    return {
        f"{name}.lora_down.weight": pair.down,
        f"{name}.lora_up.weight": up,
        f"{name}.alpha": torch.tensor(a, dtype=torch.float32),
    }


def kohya_from_official(
    official_path: StrPath,
    out_path: StrPath,
    alpha: float | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Convert an official-layout attention LoRA (as the trainer writes it,
    `<module>.processor.to_q_lora.down.weight`) into a kohya file; the source file's metadata is
    carried over unless `metadata` is given."""
    pairs = parse_attention_lora(load_state_dict(official_path), str(official_path))
    if metadata is None and Path(out_path).suffix.lower() == ".safetensors":
        metadata = read_metadata(official_path) or None
    return save_kohya_lora(pairs, out_path, alpha, metadata)
