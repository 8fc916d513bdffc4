"""LoRA file formats -> `{module_path: LoRAPair}`, and back to the official layout.

Formats read:
- official AnimateDiff (MotionLoRA, v3 domain adapter):
  `<module>.processor.to_q_lora.down.weight` (`to_out_lora` targets `to_out.0`);
- diffusers conversions of those (`unet.` prefix, `attn1`/`norm1` motion names) and PEFT
  (`.lora_A` / `.lora_B`, `.lora.down` / `.lora.up`);
- kohya / A1111 image LoRAs (`lora_unet_*`, `lora_te_*`, `.lora_down`, `.lora_up`, `.alpha`),
  conv (LoCon) layers included.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch
from torch import nn

from ..lora import LoRAPair
from .io import CheckpointError, first_keys

KOHYA_SCALINGS = ("kohya", "official")

OFFICIAL_KEY = re.compile(r"^(.*)\.processor\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight$")
PEFT_KEY = re.compile(r"^(.*)\.(lora_A|lora_B|lora\.down|lora\.up|lora_down|lora_up)\.weight$")
# diffusers' motion-module names and the original ones, read in both directions.
_MOTION_DIFFUSERS = (
    (".norm1.", ".norms.0."),
    (".norm2.", ".norms.1."),
    (".norm3.", ".ff_norm."),
    (".attn1.", ".attention_blocks.0."),
    (".attn2.", ".attention_blocks.1."),
)


def motion_path_from_diffusers(path: str) -> str:
    """`down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q` -> original name."""
    if ".motion_modules." not in path or ".temporal_transformer." in path:
        return path
    path = re.sub(r"(\.motion_modules\.\d+)\.", r"\1.temporal_transformer.", path + ".")
    for new, old in _MOTION_DIFFUSERS:
        path = path.replace(new, old)
    return path.rstrip(".")


def motion_path_to_diffusers(path: str) -> str:
    """The inverse of `motion_path_from_diffusers`: an original motion-module name or key ->
    diffusers'."""
    path = path.replace(".temporal_transformer.", ".") + "."
    for new, old in _MOTION_DIFFUSERS:
        path = path.replace(old, new)
    return path.rstrip(".")


def _strip_prefix(key: str) -> str:
    for prefix in ("unet.", "base_model.model."):
        if key.startswith(prefix):
            return key[len(prefix) :]
    return key


def parse_attention_lora(sd: Mapping[str, torch.Tensor], path: str) -> dict[str, LoRAPair]:
    """Official / diffusers / PEFT attention LoRAs (MotionLoRA, domain adapter)."""
    halves: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in sd.items():
        key = _strip_prefix(key)
        if m := OFFICIAL_KEY.match(key):
            module, proj, side = m.groups()
            target = f"{module}.{proj}" + (".0" if proj == "to_out" else "")
        elif m := PEFT_KEY.match(key):
            target, kind = m.groups()
            side = "down" if kind in ("lora_A", "lora.down", "lora_down") else "up"
        else:
            if not key.endswith(".alpha"):
                unknown.append(key)
            continue
        halves.setdefault(motion_path_from_diffusers(target), {})[side] = value
    if unknown:
        raise CheckpointError(
            path, f"not an attention LoRA; unrecognised keys: {first_keys(unknown)}"
        )
    return _pairs(halves, path)


def _pairs(halves: dict[str, dict[str, torch.Tensor]], path, scales=None) -> dict[str, LoRAPair]:
    incomplete = [t for t, h in halves.items() if set(h) != {"down", "up"}]
    if incomplete:
        raise CheckpointError(
            path, f"LoRA layers without both down and up: {first_keys(incomplete)}"
        )
    if not halves:
        raise CheckpointError(path, "holds no LoRA weights")
    scales = scales or {}
    return {t: LoRAPair(h["down"], h["up"], scales.get(t, 1.0)) for t, h in halves.items()}


def is_kohya(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_")) for k in sd)


def _underscored(model: nn.Module | None) -> dict[str, str]:
    """kohya's layer name (`down_blocks_0_attentions_0_proj_in`) -> module path."""
    if model is None:
        return {}
    return {n.replace(".", "_"): n for n, _ in model.named_modules() if n}


def parse_kohya_lora(
    sd: Mapping[str, torch.Tensor],
    path: str,
    unet: nn.Module,
    text_encoder: nn.Module | None,
    scaling: str = "kohya",
) -> tuple[dict[str, LoRAPair], dict[str, LoRAPair]]:
    """kohya names -> (unet pairs, text-encoder pairs).

    `scaling="kohya"` multiplies by `alpha / rank` as kohya, A1111 and ComfyUI do (a file
    trained with alpha 1 at rank 128 is meant to be scaled by 1/128); `"official"` ignores
    `.alpha` as the official AnimateDiff code does. They agree when alpha equals rank.
    """
    if scaling not in KOHYA_SCALINGS:
        raise ValueError(f"unknown LoRA scaling {scaling!r}; expected one of {KOHYA_SCALINGS}")
    lookups = {"lora_unet_": _underscored(unet), "lora_te_": _underscored(text_encoder)}
    if not any(k.startswith("text_model_") for k in lookups["lora_te_"]):
        # transformers >= 5 dropped the `text_model.` level that kohya names include.
        lookups["lora_te_"] = {f"text_model_{k}": v for k, v in lookups["lora_te_"].items()}
    halves: dict[str, dict[str, dict[str, torch.Tensor]]] = {"lora_unet_": {}, "lora_te_": {}}
    alphas: dict[str, dict[str, float]] = {"lora_unet_": {}, "lora_te_": {}}
    unknown = []
    for key, value in sd.items():
        prefix = next((p for p in lookups if key.startswith(p)), None)
        name, _, kind = key.partition(".")
        target = lookups[prefix].get(name[len(prefix) :]) if prefix else None
        if target is None:
            unknown.append(key)
        elif kind == "alpha":
            alphas[prefix][target] = float(value)
        elif kind in ("lora_down.weight", "lora_up.weight"):
            halves[prefix].setdefault(target, {})[kind[5:-7]] = value
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(
            path, f"kohya LoRA keys that match no layer of this model: {first_keys(unknown)}"
        )
    result = []
    for prefix in lookups:
        scales = {}
        if scaling == "kohya":
            for target, h in halves[prefix].items():
                rank = h["down"].shape[0] if "down" in h else 1
                scales[target] = alphas[prefix].get(target, rank) / rank
        result.append(_pairs(halves[prefix], path, scales) if halves[prefix] else {})
    return result[0], result[1]


def to_official_layout(pairs: Mapping[str, LoRAPair]) -> dict[str, torch.Tensor]:
    """`{module.to_q: pair}` -> official `module.processor.to_q_lora.{down,up}.weight` keys."""
    out = {}
    for target, pair in pairs.items():
        module, proj = target.removesuffix(".0").rsplit(".", 1)
        base = f"{module}.processor.{proj}_lora"
        out[f"{base}.down.weight"] = pair.down.contiguous()
        out[f"{base}.up.weight"] = (pair.up * pair.scale).contiguous()  # the format has no scale
    return out
