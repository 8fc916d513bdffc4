"""A diffusers Stable Diffusion 1.5 folder checked before anything loads from it (torch-free,
so the command line checks `--base` in its light half): the parts exist, each has weights,
and the numbers in each `config.json` are ones a model can be built from. A mistake is a
`CheckpointError` naming the file and the key, instead of an allocation that never ends or a
message about tokenizer internals."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

PARTS = ("unet", "vae", "text_encoder", "tokenizer")
WEIGHTS = (".safetensors", ".bin")
TOKENIZER_FILES = ("vocab.json", "merges.txt")
# Bounds on each part's sizes: far beyond any SD1.5-family model, far below a crash.
LIMITS: dict[str, dict[str, tuple[int, int]]] = {
    "unet": {
        "in_channels": (1, 64),
        "out_channels": (1, 64),
        "block_out_channels": (1, 8192),
        "layers_per_block": (1, 16),
        "attention_head_dim": (1, 1024),
        "num_attention_heads": (1, 1024),
        "cross_attention_dim": (1, 8192),
        "sample_size": (1, 1024),
        "norm_num_groups": (1, 1024),
        "transformer_layers_per_block": (1, 32),
    },
    "vae": {
        "in_channels": (1, 64),
        "out_channels": (1, 64),
        "latent_channels": (1, 64),
        "block_out_channels": (1, 8192),
        "layers_per_block": (1, 16),
        "sample_size": (1, 8192),
        "norm_num_groups": (1, 1024),
    },
    "text_encoder": {
        "hidden_size": (1, 16384),
        "intermediate_size": (1, 65536),
        "num_hidden_layers": (1, 128),
        "num_attention_heads": (1, 1024),
        "max_position_embeddings": (1, 16384),
        "vocab_size": (1, 1_000_000),
    },
}


def check_base_folder(folder: str | Path) -> None:
    """Raise CheckpointError unless `folder` looks like a loadable SD1.5 diffusers folder."""
    folder = Path(folder)
    if folder.is_file():
        raise CheckpointError(
            folder,
            "a file, not a folder: the base model is a diffusers SD1.5 folder (unet/, vae/, "
            "text_encoder/, tokenizer/) or a Hub id; a single-file checkpoint goes to --personal "
            "(personal=)",
        )
    missing = [part for part in PARTS if not (folder / part).is_dir()]
    if missing:
        raise CheckpointError(
            folder, f"not a diffusers SD1.5 folder: no {', '.join(p + '/' for p in missing)}"
        )
    for part in ("unet", "vae", "text_encoder"):
        config = read_config(folder / part / "config.json")
        check_config(folder / part / "config.json", config, LIMITS[part])
        if not any(f.suffix in WEIGHTS for f in (folder / part).iterdir()):
            raise CheckpointError(folder / part, "no weights (.safetensors or .bin) in it")
    tokenizer = folder / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():  # else the slow tokenizer's two files
        for name in TOKENIZER_FILES:
            if not (tokenizer / name).is_file():
                raise CheckpointError(tokenizer, f"no {name} (nor tokenizer.json) in it")


def read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise CheckpointError(path, "missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise CheckpointError(path, "not a JSON object")
    return data


def check_config(path: Path, config: dict, limits: dict[str, tuple[int, int]]) -> None:
    """Each bounded key (when present) is a whole number, or a list of them, within bounds;
    channels divide into their normalisation groups, and width into attention heads."""
    for key, (low, high) in limits.items():
        value = config.get(key)
        if value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, bool) or not isinstance(item, int) or not low <= item <= high:
                raise CheckpointError(
                    path, f"{key}: {value!r} is not a whole number in [{low}, {high}]"
                )
    groups = config.get("norm_num_groups")
    for channels in config.get("block_out_channels") or []:
        if groups and channels % groups:
            raise CheckpointError(
                path,
                f"block_out_channels: {channels} is not a multiple of norm_num_groups {groups}",
            )
    heads, width = config.get("num_attention_heads"), config.get("hidden_size")
    if isinstance(heads, int) and isinstance(width, int) and width % heads:
        raise CheckpointError(
            path, f"hidden_size {width} is not a multiple of num_attention_heads {heads}"
        )
