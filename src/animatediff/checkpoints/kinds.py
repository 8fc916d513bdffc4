"""What a safetensors file certainly is, from the key names in its header alone: torch-free and
instant, so the command line can refuse a file given to the wrong flag before any model loads.

Only strong signatures count (a motion module's `motion_modules.` keys, a single-file SD
checkpoint's `model.diffusion_model.`, a kohya LoRA's `lora_unet_`, ...); a file with none of them,
or another format (.ckpt, .pt, .bin), is left to its loader, which checks it fully.
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

from ..errors import CheckpointError

MAX_HEADER = 100_000_000  # bytes: safetensors itself rejects larger headers

# Strong signatures, in the order they are tried: (kind, test on the set of key names).
SIGNATURES = (
    ("SparseCtrl encoder", lambda k: _has(k, ".motion_modules.") and _has(k, "controlnet_cond")),
    ("MotionLoRA", lambda k: _has(k, ".motion_modules.") and _has(k, "lora")),
    ("motion module", lambda k: _has(k, ".motion_modules.") or _starts(k, "motion_modules.")),
    ("single-file SD checkpoint", lambda k: _starts(k, "model.diffusion_model.")),
    (
        "ControlNet",
        lambda k: _starts(k, "control_model.") or _starts(k, "controlnet_cond_embedding."),
    ),
    ("IP-Adapter", lambda k: _starts(k, "image_proj.") and _starts(k, "ip_adapter.")),
    ("kohya LoRA", lambda k: _starts(k, "lora_unet_") or _starts(k, "lora_te")),
    ("VAE", lambda k: _starts(k, "decoder.conv_in.") and _starts(k, "encoder.conv_in.")),
    ("embedding", lambda k: bool(k & {"emb_params", "string_to_param", "clip_l", "clip_g"})),
)
# Per model kind (checkpoints.hub.KINDS), the strong kinds a file given for it may be.
ACCEPTS = {
    "motion_module": {"motion module"},
    "motion_lora": {"MotionLoRA"},
    "lora": {"kohya LoRA"},
    "adapter": {"kohya LoRA"},
    "personal": {"single-file SD checkpoint", "kohya LoRA"},
    "vae": {"VAE", "single-file SD checkpoint"},
    "sparsectrl": {"SparseCtrl encoder", "ControlNet"},
    "controlnet": {"ControlNet"},
    "ip_adapter": {"IP-Adapter"},
    "embedding": {"embedding"},
}
NAMES = {
    "motion_module": "a motion module",
    "motion_lora": "a MotionLoRA",
    "lora": "an image LoRA",
    "adapter": "a domain adapter",
    "personal": "a personalised model",
    "vae": "a VAE",
    "sparsectrl": "a SparseCtrl encoder",
    "controlnet": "a ControlNet",
    "ip_adapter": "an IP-Adapter",
    "embedding": "an embedding",
}


def _has(keys: frozenset[str], part: str) -> bool:
    return any(part in k for k in keys)


def _starts(keys: frozenset[str], prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


def sniff_format(path: Path) -> str:
    """Classify a file by content: "safetensors", "zip" (torch.save), "pickle" (legacy) or
    "unknown"."""
    try:
        with path.open("rb") as f:
            head = f.read(9)
    except OSError as e:
        raise CheckpointError(path, f"cannot read file ({e.strerror or e})") from e
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5:  # pickle PROTO opcode
        return "pickle"
    # safetensors: 8-byte little-endian header length, then a JSON object.
    if len(head) == 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def unknown_format_reason(path: Path) -> str:
    reason = "unrecognised content: not safetensors, a PyTorch zip archive or a pickle"
    if path.suffix.lower() == ".safetensors":
        reason = "no safetensors header; " + reason
    return reason


def invalid(path: str | os.PathLike, reason: str) -> CheckpointError:
    return CheckpointError(path, f"not a valid checkpoint ({reason})")


def check_format(path: Path) -> None:
    """A weight file must look like one (its loader checks the rest, safely)."""
    fmt = sniff_format(path)
    if fmt == "unknown":
        raise invalid(path, unknown_format_reason(path))
    if fmt == "zip" and not zipfile.is_zipfile(path):
        raise invalid(path, "truncated or corrupt zip archive")
    if fmt == "safetensors":
        read_safetensors_header(path)


def read_safetensors_header(path: Path) -> dict[str, object]:
    """A safetensors file's JSON header, checked to be one (a clear message if truncated)."""
    size = path.stat().st_size
    with path.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
        if header_len > min(size - 8, MAX_HEADER):
            raise invalid(
                path,
                f"truncated or corrupt safetensors file: header claims {header_len} bytes, "
                f"file has {size} bytes",
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except ValueError as e:
        raise invalid(path, f"corrupt safetensors header: {e}") from e
    if not isinstance(header, dict):
        raise invalid(path, "corrupt safetensors header: not a JSON object")
    return header


def safetensors_keys(path: str | os.PathLike) -> frozenset[str] | None:
    """The tensor names in a safetensors file's header; None if it is not one."""
    try:
        header = read_safetensors_header(Path(path))
    except (CheckpointError, OSError):
        return None
    return frozenset(k for k in header if k != "__metadata__")


def strong_kind(path: str | os.PathLike) -> str | None:
    """What the file certainly is (a SIGNATURES name), or None when its keys do not say."""
    keys = safetensors_keys(path)
    if not keys:
        return None
    return next((kind for kind, test in SIGNATURES if test(keys)), None)


def check_kind(path: str | os.PathLike, kind: str) -> None:
    """Raise CheckpointError when a file given as `kind` is not a weight file, or certainly
    another kind of model."""
    if kind not in ACCEPTS or not Path(path).is_file():
        return
    check_format(Path(path))
    found = strong_kind(path)
    if found is not None and found not in ACCEPTS[kind]:
        article = "an" if found[0] in "AEIOU" else "a"
        raise CheckpointError(path, f"this is {article} {found}, not {NAMES[kind]}")
