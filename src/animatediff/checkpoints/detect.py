"""What a weight file is: kind, version, dtype, size (for `animatediff inspect`), and which
published release it is (AnimateDiff-Lightning, AnimateLCM) with the sampler it expects."""

from __future__ import annotations

from pathlib import Path

import torch

from .base import LDM_TEXT, LDM_UNET, LDM_VAE
from .fewstep import I2V_UNSUPPORTED, Release, lora_release, motion_release
from .io import describe_dtypes, load_state_dict, read_metadata
from .lora import OFFICIAL_KEY, PEFT_KEY, is_kohya
from .motion import DIFFUSERS_WEIGHTS, is_motion_state_dict, read_motion_checkpoint


def _params(sd) -> int:
    return sum(v.numel() for k, v in sd.items() if not k.endswith(".pe"))


def describe(path: str | Path) -> dict:
    """A dict of facts about a file or diffusers folder; raises CheckpointError if unreadable."""
    path = Path(path)
    if path.is_dir():
        return _describe_folder(path)
    sd = load_state_dict(path)
    facts = _classify(path, sd)
    info = {
        "file": str(path),
        "kind": facts.pop("kind"),
        "dtype": describe_dtypes(sd),
        "tensors": len(sd),
        "parameters": _params(sd),
    }
    return {**info, **facts}


def _describe_folder(path: Path) -> dict:
    if (path / "model_index.json").exists():
        return {"file": str(path), "kind": "diffusers pipeline folder"}
    if any((path / n).exists() for n in DIFFUSERS_WEIGHTS):
        ckpt = read_motion_checkpoint(path)
        return {"file": str(path), "kind": "motion module", **_motion_facts(ckpt)}
    return {"file": str(path), "kind": "unknown folder"}


def release_facts(release: Release | None) -> dict:
    """`release`, how it was recognised, and the sampler its authors use (empty if none)."""
    if release is None:
        return {}
    facts = {"release": release.name, "release_from": release.source}
    if not release.supported:
        facts["supported"] = False
    if release.preset:
        facts["preset"] = release.preset
        facts["sampler"] = release.sampler
    if release.steps:
        facts["steps"] = release.steps
    return facts


def _motion_facts(ckpt) -> dict:
    c = ckpt.config
    return {
        **release_facts(ckpt.release),
        "version": c.version,
        "version_from": ckpt.version_source,
        "layout": ckpt.layout,
        "dtype": describe_dtypes(ckpt.state_dict),
        "parameters": _params(ckpt.state_dict),
        "mid_block": c.mid_block,
        "groupnorm": "over all frames" if c.groupnorm_across_frames else "per frame",
        "stored_pe_length": ckpt.stored_pe_length,
        "max_frames": c.max_frames,
        "block_out_channels": list(c.block_out_channels),
    }


def _classify(path: Path, sd: dict[str, torch.Tensor]) -> dict:
    keys = list(sd)
    if is_kohya(sd):
        ranks = sorted({v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")})
        return {
            "kind": "image LoRA (kohya)",
            **release_facts(lora_release(path, read_metadata(path))),
            "ranks": ranks,
            "layers": sum(k.endswith("lora_down.weight") for k in keys),
        }
    lora_keys = [k for k in keys if OFFICIAL_KEY.match(k) or PEFT_KEY.match(k)]
    if lora_keys:
        down = [sd[k] for k in lora_keys if k.endswith(("down.weight", "lora_A.weight"))]
        motion = any(".motion_modules." in k for k in lora_keys)
        return {
            "kind": "MotionLoRA" if motion else "attention LoRA (domain adapter / image)",
            "ranks": sorted({d.shape[0] for d in down}),
            "layers": len(down),
        }
    if is_motion_state_dict(sd) and any(k.startswith("conv_in.") for k in keys):
        return {
            "kind": "SparseCtrl / motion ControlNet",
            "condition_channels": sd["conv_in.weight"].shape[1] if "conv_in.weight" in sd else None,
        }
    if is_motion_state_dict(sd) and any(k.startswith("img_encoder.") for k in keys):
        release = motion_release(path, {}, img_encoder=True)
        return {"kind": "motion module", **release_facts(release), "note": I2V_UNSUPPORTED}
    if is_motion_state_dict(sd):
        return {"kind": "motion module", **_motion_facts(read_motion_checkpoint(path))}
    if any(k.startswith(LDM_UNET) for k in keys):
        sdxl = any(k.startswith("conditioner.embedders.") for k in keys)
        parts = [
            n
            for n, p in (("unet", LDM_UNET), ("vae", LDM_VAE), ("text_encoder", LDM_TEXT))
            if any(k.startswith(p) for k in keys)
        ]
        return {
            "kind": "single-file SDXL checkpoint" if sdxl else "single-file SD checkpoint",
            "parts": parts,
        }
    if any(k.startswith(("decoder.", LDM_VAE + "decoder.")) for k in keys):
        return {"kind": "VAE"}
    for prefix, kind in (
        ("vision_model.", "CLIP image encoder"),
        ("text_model.", "CLIP text encoder"),
    ):
        if any(k.startswith(prefix) for k in keys):
            return {"kind": kind}
    return {"kind": "unknown"}
