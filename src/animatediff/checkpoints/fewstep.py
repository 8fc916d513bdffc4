"""Few-step (distilled) releases: AnimateDiff-Lightning and AnimateLCM, told apart from the
AnimateDiff modules whose architecture they share.

What was verified, and where (model cards of ByteDance/AnimateDiff-Lightning and
wangfuyun/AnimateLCM, the AnimateLCM code G-U-N/AnimateLCM, ComfyUI-AnimateDiff-Evolved):
- AnimateDiff-Lightning: "distilled from AnimateDiff SD1.5 v2" (card): a v2 module (mid-block
  module, 32-frame positional encoding, per-frame GroupNorm). `*_diffusers.safetensors` loads into
  a default `MotionAdapter()` with strict `load_state_dict` (card), i.e. diffusers keys with
  `pos_embed.pe`; `*_comfyui.safetensors` has the original keys. Key for key a v2 module: only
  the name (or metadata this project wrote) tells it apart.
- AnimateLCM t2v: `AnimateLCM_sd15_t2v.ckpt` is a pickle of a v2-shaped module
  (`motion_module_mid_block: true`, `use_inflated_groupnorm: true` = per-frame GroupNorm, in
  its inference-t2v.yaml) without any `pos_encoder` buffer: its encoding, the same sinusoid, is
  a 64-frame buffer the file does not store (ComfyUI-AnimateDiff-Evolved recognises it by that).
- AnimateLCM LoRA (`AnimateLCM_sd15_t2v_lora.safetensors`): kohya keys in diffusers naming
  (`lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`, `.alpha`), UNet only, on
  attention, feed-forward, resnet and sampler layers, as LCM-LoRA's. The official code merges
  `W += strength / 8 * up @ down`; the card loads it with diffusers (alpha / rank), so
  kohya scaling (`lora_scaling="kohya"`) is the rule that gives both.
- AnimateLCM-I2V adds an `img_encoder` (a T2I-Adapter-style encoder of the first frame's latent
  whose features are added inside the down blocks), a different noise schedule (beta_end 0.014)
  and its own LoRA: not supported here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

RELEASE_METADATA_KEY = "animatediff.release"
ANIMATELCM_PE_LENGTH = 64  # AnimateLCM's PositionalEncoding(max_length=64), not stored
I2V_UNSUPPORTED = (
    "AnimateLCM-I2V motion module: its `img_encoder` (an adapter that encodes the first "
    "frame's latent and adds its features inside the down blocks) is not supported; use "
    "AnimateLCM_sd15_t2v.ckpt"
)

# What the authors sample with (the model cards' code), for `animatediff inspect`; the settings
# themselves are `animatediff.pipeline.presets.PRESETS`.
SAMPLERS = {
    "lightning": "Euler, trailing timestep spacing, linear betas; as many steps as the file's "
    "step count; guidance 1 (no negative prompt pass)",
    "animatelcm": "LCM on linear betas, 6 steps (4-8), guidance 2 (1-2); "
    "with the AnimateLCM LoRA at 0.8",
}
_GENERIC_NAMES = ("diffusion_pytorch_model", "model", "pytorch_lora_weights")


@dataclass(frozen=True)
class Release:
    """A published checkpoint recognised by name, metadata or keys."""

    name: str  # "AnimateDiff-Lightning 4-step", "AnimateLCM t2v", "AnimateLCM LoRA", ...
    preset: str | None  # the sampler preset its authors use; None: none known
    steps: int | None = None  # the distilled step count (Lightning)
    source: str = "file name"  # how it was recognised
    supported: bool = True

    def as_dict(self) -> dict:
        return asdict(self)

    @property
    def sampler(self) -> str | None:
        return SAMPLERS.get(self.preset) if self.preset else None


def release_metadata(release: Release) -> dict[str, str]:
    """safetensors metadata that keeps a release recognisable under any file name."""
    fields = {k: v for k, v in release.as_dict().items() if k not in ("source", "supported")}
    return {RELEASE_METADATA_KEY: json.dumps(fields, sort_keys=True)}


def release_from_metadata(metadata: Mapping[str, str]) -> Release | None:
    text = metadata.get(RELEASE_METADATA_KEY)
    if text is None:
        return None
    try:
        fields = json.loads(text)
        return Release(fields["name"], fields.get("preset"), fields.get("steps"), "metadata")
    except (ValueError, KeyError, TypeError):
        return None  # unreadable: fall back on the other clues


def _names(path: str | Path) -> str:
    """The lower-case name that identifies a file: its own, or for generic diffusers names
    (`diffusion_pytorch_model.safetensors`) also the folders above it (a hub cache's
    `models--wangfuyun--AnimateLCM/snapshots/<hash>/`)."""
    path = Path(path)
    parts = [path.name]
    if path.is_dir() or path.stem in _GENERIC_NAMES:
        parts += [p.name for p in list(path.parents)[:3]]
    return " ".join(parts).lower()


def _lightning(name: str) -> Release | None:
    if "lightning" not in name:
        return None
    m = re.search(r"(\d+)[-_ ]?steps?", name)
    steps = int(m.group(1)) if m else None
    label = f"AnimateDiff-Lightning {steps}-step" if steps else "AnimateDiff-Lightning"
    return Release(label, "lightning", steps)


def _is_animatelcm_name(name: str) -> bool:
    # `sd15_t2v_beta*` / `sd15_lora_beta*` were the first release's names
    return "lcm" in name or "sd15_t2v_beta" in name or "sd15_lora_beta" in name


def motion_release(
    path: str | Path,
    metadata: Mapping[str, str],
    img_encoder: bool = False,
    pe_less_pickle_v2: bool = False,
) -> Release | None:
    """The release a motion-module file is, if any. `img_encoder`: the file has `img_encoder.*`
    keys (AnimateLCM-I2V); `pe_less_pickle_v2`: a pickled v2-shaped module with no
    positional-encoding buffers and no stored configuration (how AnimateLCM t2v was released;
    the released AnimateDiff `.ckpt` files all carry them)."""
    if img_encoder:
        return Release("AnimateLCM i2v", None, source="img_encoder keys", supported=False)
    if (found := release_from_metadata(metadata)) is not None:
        return found
    name = _names(path)
    if (found := _lightning(name)) is not None:
        return found
    if _is_animatelcm_name(name):
        return Release("AnimateLCM t2v", "animatelcm")
    if pe_less_pickle_v2:
        source = "keys: no positional-encoding buffers in a pickle (guessed; pass a name)"
        return Release("AnimateLCM t2v", "animatelcm", source=source)
    return None


def lora_release(path: str | Path, metadata: Mapping[str, str]) -> Release | None:
    """The release an image-LoRA file is, if any (its keys are a plain kohya LoRA's)."""
    if (found := release_from_metadata(metadata)) is not None:
        return found
    name = _names(path)
    if not _is_animatelcm_name(name) or ("lcm" in name and "animate" not in name):
        return None  # a plain LCM-LoRA is for images, with SD's own schedule
    if "i2v" in name:
        return Release("AnimateLCM i2v LoRA", None)  # for the i2v module (not supported)
    return Release("AnimateLCM LoRA", "animatelcm")
