"""Motion-module files: detect layout and version, load strictly, export both layouts.

Layouts:
- original (the released `.ckpt` files and their `.safetensors` repacks):
  `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight`,
  optionally with `...attention_blocks.N.pos_encoder.pe` buffers;
- diffusers (`MotionAdapter` folders or files):
  `down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight`, `norm1/2/3`,
  `transformer_blocks.N.pos_embed.pe`.

Few-step releases in these layouts (AnimateDiff-Lightning, AnimateLCM) are recognised too
(`MotionCheckpoint.release`, see `checkpoints.fewstep`).
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..motion.config import VERSIONS, MotionModuleConfig
from ..motion.module import MotionModules, sinusoidal_encoding
from .fewstep import (
    ANIMATELCM_PE_LENGTH,
    I2V_UNSUPPORTED,
    Release,
    motion_release,
    release_metadata,
)
from .io import (
    CheckpointError,
    check_keys,
    load_state_dict,
    read_metadata,
    save_state_dict,
)
from .kinds import sniff_format
from .lora import motion_path_from_diffusers, motion_path_to_diffusers

CONFIG_METADATA_KEY = "animatediff.motion_config"
MAX_PE_LENGTH = 1 << 16  # positions a stored configuration may ask for
DIFFUSERS_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_PE = re.compile(r"\.(pos_encoder|pos_embed)\.pe$")
_NORM_KEY = re.compile(
    r"^(down_blocks|up_blocks)\.(\d+)\.motion_modules\.(\d+)\.temporal_transformer\.norm\.weight$"
)


@dataclass(frozen=True)
class MotionCheckpoint:
    """A motion-module file read into memory, in the original layout, `pe` buffers dropped."""

    path: str
    state_dict: dict[str, torch.Tensor]
    config: MotionModuleConfig
    layout: str  # "original" | "diffusers"
    version_source: str  # how the version was decided, for `inspect` and warnings
    stored_pe_length: int | None
    release: Release | None = None  # AnimateDiff-Lightning, AnimateLCM, ... (fewstep.py)


def is_motion_state_dict(sd: Mapping[str, torch.Tensor]) -> bool:
    return any(".motion_modules." in k for k in sd) and not any(
        k.endswith("_lora.down.weight") for k in sd
    )


def read_motion_checkpoint(path: str | Path, version: str | None = None) -> MotionCheckpoint:
    """Read any supported motion-module file; `version` overrides detection."""
    path = Path(path)
    file, diffusers_config = _resolve(path)
    sd = load_state_dict(file)
    metadata = read_metadata(file)
    if not is_motion_state_dict(sd):
        raise CheckpointError(file, "not a motion module (no `motion_modules` keys)")
    if any(k.startswith("img_encoder.") for k in sd):
        raise CheckpointError(file, I2V_UNSUPPORTED)
    layout = "diffusers" if any(".attn1." in k for k in sd) else "original"
    pe_length = _pe_length(sd)
    sd = {motion_path_from_diffusers(k): v for k, v in sd.items() if not _PE.search(k)}
    release = _release(path, file, sd, metadata, layout, pe_length)
    config, source = _config(path, file, sd, metadata, diffusers_config, pe_length, version, layout)
    if release is not None and release.preset == "animatelcm" and pe_length is None:
        config = config.replace(max_frames=max(config.max_frames, ANIMATELCM_PE_LENGTH))
    return MotionCheckpoint(str(file), sd, config, layout, source, pe_length, release)


def _release(path, file, sd, metadata, layout, pe_length) -> Release | None:
    # AnimateLCM t2v was released as a pickle without `pos_encoder` buffers; safetensors repacks
    # of any version often drop them, so there the missing buffers say nothing.
    pe_less_pickle_v2 = (
        layout == "original"
        and pe_length is None
        and CONFIG_METADATA_KEY not in metadata
        and any(k.startswith("mid_block.") for k in sd)
        and sniff_format(file) != "safetensors"
    )
    return motion_release(path, metadata, pe_less_pickle_v2=pe_less_pickle_v2)


def load_motion_module(
    path: str | Path, version: str | None = None, dtype: torch.dtype | None = None
) -> MotionModules:
    """A `MotionModules` with the file's weights, loaded strictly."""
    ckpt = read_motion_checkpoint(path, version)
    return build_motion_module(ckpt, dtype)


def build_motion_module(ckpt: MotionCheckpoint, dtype: torch.dtype | None = None) -> MotionModules:
    module = MotionModules(ckpt.config)
    check_keys(
        ckpt.path, module.state_dict(), ckpt.state_dict, f"a motion module {ckpt.config.version}"
    )
    module.load_state_dict(ckpt.state_dict, strict=True)
    return module.to(dtype) if dtype is not None else module


def _resolve(path: Path) -> tuple[Path, dict | None]:
    """A diffusers folder -> its weights file and config.json."""
    if not path.is_dir():
        config = path.parent / "config.json"
        return path, _read_json(
            config
        ) if path.name in DIFFUSERS_WEIGHTS and config.exists() else None
    for name in DIFFUSERS_WEIGHTS:
        if (path / name).exists():
            config = path / "config.json"
            return path / name, _read_json(config) if config.exists() else None
    raise CheckpointError(path, f"folder has no {' or '.join(DIFFUSERS_WEIGHTS)}")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(path, f"unreadable config ({e})") from e


def _pe_length(sd: Mapping[str, torch.Tensor]) -> int | None:
    lengths = {v.shape[-2] for k, v in sd.items() if _PE.search(k) and v.ndim >= 2}
    return max(lengths) if lengths else None


def _config(
    path, file, sd, metadata, diffusers_config, pe_length, version, layout
) -> tuple[MotionModuleConfig, str]:
    if CONFIG_METADATA_KEY in metadata:
        config = _stored_config(file, metadata[CONFIG_METADATA_KEY])
        source = "stored config"
    else:
        found = (version, "given") if version else None
        config, source = _config_from_keys(
            path, file, sd, diffusers_config, pe_length, layout, found
        )
    if version is not None:
        if version not in VERSIONS:
            raise ValueError(
                f"unknown motion module version {version!r}; expected one of {VERSIONS}"
            )
        preset = MotionModuleConfig.preset(version)
        config = config.replace(
            version=version, groupnorm_across_frames=preset.groupnorm_across_frames
        )
        source = "given"
    if config.mid_block != any(k.startswith("mid_block.") for k in sd):
        raise CheckpointError(
            file,
            f"version {config.version} {'needs' if config.mid_block else 'has no'} a mid-block module",
        )
    _check_shapes(file, sd, config)
    return config, source


def _stored_config(file, text: str) -> MotionModuleConfig:
    try:
        return MotionModuleConfig.from_json(text)
    except (ValueError, TypeError) as e:
        raise CheckpointError(file, f"metadata {CONFIG_METADATA_KEY}: {e}") from None


def _check_shapes(file, sd, config: MotionModuleConfig) -> None:
    """A configuration (stored, or read from a config.json) must describe these weights:
    otherwise building the module would fail late, or allocate something absurd."""
    stored = tuple(
        v.shape[0]
        for k, v in sorted(sd.items(), key=lambda kv: _block_index(kv[0]))
        if (m := _NORM_KEY.match(k)) and m.group(1) == "down_blocks" and m.group(3) == "0"
    )
    if stored and tuple(config.block_out_channels) != stored:
        raise CheckpointError(
            file, f"block_out_channels {list(config.block_out_channels)} do not match the "
            f"weights' {list(stored)}"
        )  # fmt: skip
    heads = config.num_attention_heads
    if not isinstance(heads, int) or heads < 1 or any(c % heads for c in stored):
        raise CheckpointError(
            file, f"num_attention_heads {heads!r} does not divide the channels {list(stored)}"
        )
    groups = config.norm_num_groups
    if not isinstance(groups, int) or groups < 1 or any(c % groups for c in stored):
        raise CheckpointError(
            file, f"norm_num_groups {groups!r} does not divide the channels {list(stored)}"
        )
    if not isinstance(config.max_frames, int) or not 1 <= config.max_frames <= MAX_PE_LENGTH:
        raise CheckpointError(
            file, f"max_frames {config.max_frames!r} is not a whole number in [1, {MAX_PE_LENGTH}]"
        )


def _block_index(key: str) -> int:
    m = _NORM_KEY.match(key)
    return int(m.group(2)) if m else -1


def _config_from_keys(
    path, file, sd, diffusers_config, pe_length, layout, found
) -> tuple[MotionModuleConfig, str]:
    channels: dict[int, int] = {}
    per_block: dict[tuple[str, int], int] = {}
    for key, value in sd.items():
        if m := _NORM_KEY.match(key):
            kind, block, index = m.group(1), int(m.group(2)), int(m.group(3))
            if kind == "down_blocks":
                channels[block] = value.shape[0]
            per_block[(kind, block)] = max(per_block.get((kind, block), 0), index + 1)
    if not channels:
        raise CheckpointError(file, "no down-block motion modules found")
    block_out = tuple(channels[i] for i in sorted(channels))
    layers = per_block[("down_blocks", 0)]
    n_transformer = 1 + max(
        int(m.group(1)) for k in sd if (m := re.search(r"\.transformer_blocks\.(\d+)\.", k))
    )
    n_attention = 1 + max(
        int(m.group(1)) for k in sd if (m := re.search(r"\.attention_blocks\.(\d+)\.", k))
    )
    has_mid = any(k.startswith("mid_block.") for k in sd)
    heads = 8
    if diffusers_config:
        h = diffusers_config.get("motion_num_attention_heads", 8)
        heads = h[0] if isinstance(h, list) and h else h
        pe_length = pe_length or diffusers_config.get("motion_max_seq_length")
    names = _names(path, file, diffusers_config)
    version, source = found or _guess_version(file, sd, has_mid, pe_length, layout, names)
    preset = MotionModuleConfig.preset(version)
    config = preset.replace(
        block_out_channels=block_out,
        layers_per_block=layers,
        num_transformer_blocks=n_transformer,
        attention_block_types=("Temporal_Self",) * n_attention,
        num_attention_heads=heads,
        max_frames=pe_length or preset.max_frames,
    )
    return config, source


# Version names in file, folder and Hub repo names (mm_sd_v15_v2, v3_sd15_mm,
# animatediff-motion-adapter-v1-5-3, ...): "v1-5-N" / "v15_vN" is SD1.5's module vN.
_NAME_VERSIONS = (
    ("v3", re.compile(r"v1[-_.]?5[-_.]v?3(?!\d)|(?<![a-z0-9])v3(?!\d)")),
    ("v2", re.compile(r"v1[-_.]?5[-_.]v?2(?!\d)|(?<![a-z0-9])v2(?!\d)")),
    ("v1", re.compile(r"v1[-_.]?[45](?![-_.]v?\d)|(?<![a-z0-9])v1(?![-_.]?\d)")),
)


def _names(path, file: Path, diffusers_config: dict | None) -> list[str]:
    """Names that may say the version: the file's (its folder's for a diffusers weights file),
    the folder given, a Hub repo's in huggingface_hub's cache (`models--owner--name`), and
    the model a diffusers config says it came from."""
    names = [file.parent.name if file.name in DIFFUSERS_WEIGHTS else file.name, Path(path).name]
    names += [p.split("--")[-1] for p in Path(file).parts if p.startswith("models--")]
    origin = (diffusers_config or {}).get("_name_or_path")
    names += [str(origin)] if origin else []
    return [n.lower() for n in names]


def _named_version(names: list[str]) -> tuple[str, str] | None:
    for name in names:
        for version, pattern in _NAME_VERSIONS:
            if version != "v2" and pattern.search(name):
                return version, f"name {name!r}"
    return None


def _guess_version(file: Path, sd, has_mid, pe_length, layout, names) -> tuple[str, str]:
    """v2 has a mid-block module; v1 and v3 share their keys. In the original layout the
    stored positional-encoding length tells them apart (24 in v1, 32 in v3), then the file
    name, then the dtype (v3 was released in fp16). In diffusers' layout the length says
    little (diffusers' converter writes 32 for every version, as the Hub's v1 adapter has):
    a name must say it, or `version=`."""
    if has_mid:
        return "v2", "mid-block module"
    if pe_length == 24:
        return "v1", "positional encoding length 24"
    if layout == "diffusers":
        named = _named_version(names)
        if named is None:
            raise CheckpointError(
                file,
                "a motion module in diffusers' layout is v1 or v3, which that layout cannot "
                "tell apart (same keys; diffusers stores 32 positions for both) and no name "
                "here says which: pass --motion-version v1 or v3 (motion_version=)",
            )
        return named
    if pe_length is not None and pe_length >= 32:
        return "v3", f"positional encoding length {pe_length}"
    named = _named_version(names[:1])
    if named is not None:
        return named[0], "file name"
    if next(iter(sd.values())).dtype == torch.float16:
        return "v3", "fp16 weights (guessed; pass version= to be sure)"
    return "v1", "no distinguishing feature (guessed; pass version= to be sure)"


# -- export ------------------------------------------------------------------------------------
def to_diffusers_layout(sd: Mapping[str, torch.Tensor], config: MotionModuleConfig) -> dict:
    """Original keys -> diffusers `MotionAdapter` keys, with the `pe` buffers it expects."""
    out = {}
    for key, value in sd.items():
        new = motion_path_to_diffusers(key)
        out[new] = value
        if new.endswith(".norm1.weight"):
            pe = sinusoidal_encoding(config.max_frames, value.shape[0], dtype=value.dtype)
            out[new.replace(".norm1.weight", ".pos_embed.pe")] = pe.unsqueeze(0).clone()
    return out


def with_pe_buffers(sd: Mapping[str, torch.Tensor], config: MotionModuleConfig) -> dict:
    out = dict(sd)
    for key, value in sd.items():
        m = re.match(r"(.*\.attention_blocks\.\d+)\.to_q\.weight$", key)
        if m:
            pe = sinusoidal_encoding(config.max_frames, value.shape[1], dtype=value.dtype)
            out[f"{m.group(1)}.pos_encoder.pe"] = pe.unsqueeze(0).clone()
    return out


def diffusers_adapter_config(config: MotionModuleConfig) -> dict:
    return {
        "_class_name": "MotionAdapter",
        "block_out_channels": list(config.block_out_channels),
        "motion_layers_per_block": config.layers_per_block,
        "motion_mid_block_layers_per_block": 1,
        "motion_num_attention_heads": config.num_attention_heads,
        "motion_norm_num_groups": config.norm_num_groups,
        "motion_max_seq_length": config.max_frames,
        "use_motion_mid_block": config.mid_block,
        "motion_transformer_layers_per_block": config.num_transformer_blocks,
        "conv_in_channels": None,
    }


def save_motion_module(
    module: MotionModules | MotionCheckpoint,
    path: str | Path,
    layout: str = "original",
    overwrite: bool = True,
    extra_metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write a motion module: `original` -> one file (.safetensors or .ckpt); `diffusers` ->
    a folder with config.json and diffusion_pytorch_model.safetensors. The configuration (and
    a recognised release) is stored in the safetensors metadata so the file reloads without
    guessing."""
    release = None
    if isinstance(module, MotionCheckpoint):
        sd, config, release = module.state_dict, module.config, module.release
    else:
        sd, config = module.state_dict(), module.config
    metadata = {CONFIG_METADATA_KEY: config.to_json(), **(extra_metadata or {})}
    if release is not None:
        metadata.update(release_metadata(release))
    path = Path(path)
    if layout == "original":
        if path.suffix.lower() == ".safetensors":
            return save_state_dict(dict(sd), path, metadata=metadata, overwrite=overwrite)
        # Pickles carry no metadata: write the `pe` buffers as the released files do, so the
        # version (24 frames: v1, 32: v3) is recognised again on reload.
        return save_state_dict(with_pe_buffers(sd, config), path, overwrite=overwrite)
    if layout != "diffusers":
        raise ValueError(f"unknown layout {layout!r}; expected 'original' or 'diffusers'")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists (pass overwrite=True)")
    path.mkdir(parents=True, exist_ok=True)
    save_state_dict(to_diffusers_layout(sd, config), path / DIFFUSERS_WEIGHTS[0], metadata=metadata)
    (path / "config.json").write_text(json.dumps(diffusers_adapter_config(config), indent=2))
    return path
