"""Reading and writing weight files safely: `load_state_dict` (and `load_object` for nested
pickles) for every weight file the project reads, `save_state_dict` for those it writes.

Checkpoints come from the internet, so loading never executes code: safetensors files are
plain data, and pickles (``.ckpt``/``.pt``/``.pth``/``.bin``) go through
``torch.load(weights_only=True)``, which refuses anything but tensors and containers. Every
failure is a :class:`CheckpointError` whose message starts with the offending file's path.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import stat
import sys
import tempfile
import warnings
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeAlias

import safetensors.torch
import torch
from safetensors import SafetensorError

from ..errors import CheckpointError, first_keys
from .kinds import invalid, read_safetensors_header, sniff_format, unknown_format_reason

__all__ = [
    "CheckpointError",
    "check_keys",
    "describe_dtypes",
    "dtype_name",
    "first_keys",
    "load_object",
    "load_state_dict",
    "read_metadata",
    "save_state_dict",
    "unwrap_state_dict",
]

StrPath: TypeAlias = "str | os.PathLike[str]"

# Wrapper keys seen in the wild: Lightning/LDM ("state_dict"), DeepSpeed ("module"), generic
# training scripts ("model"), and AnimateDiff's SparseCtrl releases ("controlnet").
_WRAPPER_KEYS = ("state_dict", "module", "model", "controlnet")
_MAX_WRAP_DEPTH = 2
# DDP ("module.") and torch.compile ("_orig_mod.") prefix every key of the wrapped model.
_STRIP_PREFIXES = ("module.", "_orig_mod.")
_SAVE_SUFFIXES_TORCH = (".ckpt", ".pt", ".pth", ".bin")
# weights_only=True had known bypasses (e.g. CVE-2025-32434) before torch 2.6.
_SAFE_PICKLE_TORCH = (2, 6)
# Messages of torch's weights-only unpickler that mean "this pickle wants to build or call
# something that is not a tensor".
_REFUSAL_PATTERN = re.compile(r"GLOBAL|unrecognized function|Can only (create|build)|is blocked")
_GLOBAL_PATTERN = re.compile(r"GLOBAL (\S+)")

_DTYPE_NAMES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.float8_e4m3fn: "fp8_e4m3fn",
    torch.float8_e5m2: "fp8_e5m2",
    torch.complex64: "c64",
    torch.complex128: "c128",
}


# --------------------------------------------------------------------------------------------
# Small formatting helpers
# --------------------------------------------------------------------------------------------


def dtype_name(dtype: torch.dtype) -> str:
    """Short name of a dtype: ``fp16``, ``bf16``, ``fp32``, ``int64``, ..."""
    return _DTYPE_NAMES.get(dtype, str(dtype).removeprefix("torch."))


def describe_dtypes(sd: Mapping[str, torch.Tensor]) -> str:
    """Summarise a state dict's dtypes: ``"fp16"``, or ``"mixed (fp16, fp32)"``."""
    names = sorted({dtype_name(t.dtype) for t in sd.values() if isinstance(t, torch.Tensor)})
    if not names:
        return "empty"
    if len(names) == 1:
        return names[0]
    return f"mixed ({', '.join(names)})"


def _count(n: int, noun: str, plural: str | None = None) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {plural or noun + 's'}"


# --------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------


def load_state_dict(path: StrPath, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Load a weight file as a flat ``{name: tensor}`` dict without ever executing its code.

    The format is detected from the content, not the suffix, so a safetensors file named
    ``.ckpt`` (or a pickle named ``.safetensors``) still loads. Wrappers such as
    ``{"state_dict": ...}`` and ``module.`` prefixes are removed (see :func:`unwrap_state_dict`).
    """
    file = _existing_file(path)
    kind = sniff_format(file)
    raw = _load_safetensors(file) if kind == "safetensors" else _load_pickle(file, kind)
    sd = unwrap_state_dict(raw, file)
    # Loaded on the CPU first so that a bad `device` surfaces as its own error, not as a
    # corrupt-file error; moving afterwards costs nothing when device is the CPU.
    target = torch.device(device)
    if target.type == "cpu":
        return sd
    return {k: v.to(target) for k, v in sd.items()}


def load_object(path: StrPath, allowed: Iterable[type] = ()) -> object:
    """Load a weight file's object as saved (nested dicts, tensors, numbers, strings), as safely
    as :func:`load_state_dict` and without flattening it. ``allowed`` names extra classes the safe
    unpickler may rebuild (data-only classes such as ``torch.nn.ParameterDict``)."""
    file = _existing_file(path)
    kind = sniff_format(file)
    if kind == "safetensors":
        return _load_safetensors(file)
    with torch.serialization.safe_globals(list(allowed)):
        return _load_pickle(file, kind)


def read_metadata(path: StrPath) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file; ``{}`` for pickles and files without any."""
    file = _existing_file(path)
    if sniff_format(file) != "safetensors":
        return {}
    meta = _read_safetensors_header(file).get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise invalid(file, "corrupt safetensors header: __metadata__ is not a mapping")
    return {str(k): str(v) for k, v in meta.items()}


def tensors_sha256(path: StrPath) -> str:
    """A digest of a checkpoint's tensors (names, dtypes, shapes and values, in name order),
    not of its bytes: safetensors writes its header's keys in no fixed order, so the same
    weights saved twice may differ byte for byte."""
    digest = hashlib.sha256()
    for name, tensor in sorted(load_state_dict(path).items()):
        tensor = tensor.contiguous()
        digest.update(f"{name}|{dtype_name(tensor.dtype)}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def unwrap_state_dict(obj: object, path: StrPath) -> dict[str, torch.Tensor]:
    """Reduce a loaded checkpoint object to a flat dict of tensors.

    Accepts a flat dict or one wrapped (once or twice) under ``state_dict``/``module``/``model``/
    ``controlnet``; drops non-tensor entries (``global_step``, ``epoch``, ...) and strips a
    ``module.`` or ``_orig_mod.`` prefix shared by every key. A dict of groups of tensors and
    nothing else, such as IP-Adapter's ``{"image_proj": {...}, "ip_adapter": {...}}``, becomes
    ``{"image_proj.<key>": ..., "ip_adapter.<key>": ...}``, the layout of its safetensors files.
    """
    if not isinstance(obj, Mapping):
        raise invalid(path, f"it holds a {type(obj).__name__}, not a dict of tensors")
    found = _find_tensor_dict(obj, depth=0) or _flatten_groups(obj)
    if found is None:
        keys = first_keys(str(k) for k in obj)
        raise invalid(path, f"it holds no tensors; top-level keys: {keys}")
    tensors = {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, torch.Tensor)}
    return _strip_common_prefixes(tensors)


def _find_tensor_dict(obj: Mapping[object, object], depth: int) -> Mapping[object, object] | None:
    # A wrapper wins over the outer level only if it really holds tensors, so a flat dict
    # that happens to have e.g. a "model" entry of another type is left alone.
    if depth < _MAX_WRAP_DEPTH:
        for key in _WRAPPER_KEYS:
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                found = _find_tensor_dict(inner, depth + 1)
                if found is not None:
                    return found
    if any(isinstance(v, torch.Tensor) for v in obj.values()):
        return obj
    return None


def _flatten_groups(obj: Mapping[object, object]) -> dict[str, torch.Tensor] | None:
    """``{"group": {"key": tensor}}`` -> ``{"group.key": tensor}``, for dicts holding only groups."""
    groups = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, Mapping)}
    flat = {
        f"{group}.{key}": value
        for group, inner in groups.items()
        for key, value in inner.items()
        if isinstance(key, str) and isinstance(value, torch.Tensor)
    }
    return flat or None


def _strip_common_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # Repeat, since DDP around a compiled model gives "module._orig_mod.".
    stripped = True
    while stripped and sd:
        stripped = False
        for prefix in _STRIP_PREFIXES:
            if all(k.startswith(prefix) and len(k) > len(prefix) for k in sd):
                sd = {k[len(prefix) :]: v for k, v in sd.items()}
                stripped = True
    return sd


def _existing_file(path: StrPath) -> Path:
    file = Path(path)
    try:
        st = file.stat()
    except FileNotFoundError:
        raise CheckpointError(file, "file not found") from None
    except OSError as e:
        raise CheckpointError(file, f"cannot read file ({e.strerror or e})") from e
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(file, "is a directory, not a checkpoint file")
    if st.st_size == 0:
        raise invalid(file, "file is empty")
    return file


def _read_safetensors_header(file: Path) -> dict[str, object]:
    """The header (`kinds.read_safetensors_header`), and tensor data that is all there."""
    header = read_safetensors_header(file)
    with file.open("rb") as f:
        header_len = int.from_bytes(f.read(8), "little")
    size = file.stat().st_size
    needed = 8 + header_len + _data_end(file, header)
    if needed > size:
        raise invalid(
            file, f"truncated safetensors file: tensor data needs {needed} bytes, file has {size}"
        )
    return header


def _data_end(file: Path, header: dict[str, object]) -> int:
    end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise invalid(file, f"corrupt safetensors header: bad entry for {name!r}")
        if not all(isinstance(o, int) for o in offsets):
            raise invalid(file, f"corrupt safetensors header: bad offsets for {name!r}")
        end = max(end, offsets[1])
    return end


def _load_safetensors(file: Path) -> dict[str, torch.Tensor]:
    _read_safetensors_header(file)
    try:
        return safetensors.torch.load_file(file, device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError, TypeError) as e:
        raise invalid(file, f"corrupt safetensors file: {e}") from e


def _load_pickle(file: Path, kind: str) -> object:
    if torch.__version__ < _SAFE_PICKLE_TORCH:
        raise CheckpointError(
            file,
            f"pickled checkpoints can only be loaded safely with torch >= 2.6 (installed: "
            f"{torch.__version__}); upgrade torch or use a .safetensors version of this file",
        )
    if kind == "zip" and not zipfile.is_zipfile(file):
        raise invalid(file, "truncated or corrupt zip archive")
    try:
        # A file object, not a path: torch.load routes "*.safetensors" paths by suffix.
        with file.open("rb") as f, warnings.catch_warnings():
            # torch notes a protocol-4 pickle before refusing it: the refusal says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if kind == "unknown":
            raise invalid(file, unknown_format_reason(file)) from None
        # `from None`: torch's own message advises weights_only=False, which is the unsafe path.
        raise _refused(file, str(e)) from None
    except MemoryError:
        raise
    except Exception as e:  # torch reports corruption through many unrelated exception types
        if kind == "unknown":
            raise invalid(file, unknown_format_reason(file)) from e
        what = "PyTorch zip checkpoint" if kind == "zip" else "pickle"
        raise invalid(file, f"truncated or corrupt {what}: {type(e).__name__}: {e}") from e


def _refused(file: Path, torch_message: str) -> CheckpointError:
    names = sorted(set(_GLOBAL_PATTERN.findall(torch_message)))
    detail = f" (it references {', '.join(names)})" if names else ""
    if not names and not _REFUSAL_PATTERN.search(torch_message):
        # e.g. protocol-4 pickles written by pickle.dump: the safe loader stops at the first
        # instruction it does not know, before reaching any code the file may contain.
        detail = " (or pickle instructions the safe loader does not accept)"
    return CheckpointError(
        file,
        f"refused for safety: the file contains code or objects that are not plain tensors"
        f"{detail}; none of it was run. Use a .safetensors version of this file if one exists",
    )


# --------------------------------------------------------------------------------------------
# Saving
# --------------------------------------------------------------------------------------------


def save_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    path: StrPath,
    metadata: dict[str, str] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write a flat dict of tensors atomically as ``.safetensors`` or a ``.ckpt``/``.pt``/``.pth``
    /``.bin`` pickle; returns the path written. Metadata is only stored in safetensors files."""
    file = Path(path)
    is_safetensors = file.suffix.lower() == ".safetensors"
    if not is_safetensors and file.suffix.lower() not in _SAVE_SUFFIXES_TORCH:
        raise ValueError(f"{file}: unsupported suffix; use .safetensors, .ckpt, .pt, .pth or .bin")
    if metadata and not is_safetensors:
        raise ValueError(f"{file}: metadata can only be stored in .safetensors files")
    _check_savable(file, state_dict, metadata)
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file}: already exists (pass overwrite=True to replace it)")
    tensors = _prepare_for_save(state_dict)
    file.parent.mkdir(parents=True, exist_ok=True)
    if is_safetensors:
        _atomic_write(file, lambda tmp: safetensors.torch.save_file(tensors, tmp, metadata))
    else:
        _atomic_write(file, lambda tmp: torch.save(tensors, tmp))
    return file


def _check_savable(
    file: Path, state_dict: Mapping[str, torch.Tensor], metadata: dict[str, str] | None
) -> None:
    if not state_dict:
        # An empty file would fail to load again ("holds no tensors"), so refuse up front.
        raise ValueError(f"{file}: refusing to save an empty state dict")
    for k, v in state_dict.items():
        if not isinstance(k, str) or not isinstance(v, torch.Tensor):
            raise TypeError(f"{file}: state dict entry {k!r} is not a str -> Tensor pair")
    for k, v in (metadata or {}).items():
        if not isinstance(k, str) or not isinstance(v, str):
            raise TypeError(f"{file}: metadata entry {k!r} is not a str -> str pair")


def _prepare_for_save(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Detached, contiguous CPU tensors, each owning exactly its own storage.

    safetensors refuses tensors that share storage (tied weights, slices of one fused
    tensor), and torch.save would write a whole storage for a small view of it.
    """
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in state_dict.items():
        t = value.detach().cpu().contiguous()
        storage = t.untyped_storage()
        if t.numel() and (storage.data_ptr() in seen or storage.nbytes() != t.nbytes):
            t = t.clone()
            storage = t.untyped_storage()
        seen.add(storage.data_ptr())
        out[key] = t
    return out


def _atomic_write(file: Path, write: Callable[[Path], None]) -> None:
    """Write via a temp file in the same directory so readers never see a half-written file."""
    fd, tmp_name = tempfile.mkstemp(prefix=f".{file.name}.", suffix=".tmp", dir=file.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        # mkstemp creates 0600 files; give the result the permissions a normal open() would.
        os.chmod(tmp, 0o666 & ~_current_umask())
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, file)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(file.parent)


def _current_umask() -> int:
    # The only portable way to read the umask is to set it and put it back.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _fsync_dir(directory: Path) -> None:
    # Persists the rename itself; directories cannot be opened this way on Windows.
    if sys.platform == "win32":
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Strict key checking
# --------------------------------------------------------------------------------------------


def check_keys(
    path: StrPath,
    expected: Mapping[str, torch.Size] | Mapping[str, torch.Tensor],
    actual: Mapping[str, torch.Tensor],
    what: str,
) -> None:
    """Raise :class:`CheckpointError` unless ``actual`` has exactly the keys and shapes of
    ``expected``; the message lists the first missing, unexpected and misshaped keys."""
    want = {k: _shape_of(v) for k, v in expected.items()}
    have = {k: _shape_of(v) for k, v in actual.items()}
    missing = want.keys() - have.keys()
    unexpected = have.keys() - want.keys()
    misshaped = [
        f"{k} (file {list(have[k])} vs expected {list(s)})"
        for k, s in want.items()
        if k in have and have[k] != s
    ]
    problems = []
    if missing:
        problems.append(f"{_count(len(missing), 'missing key')}: {first_keys(missing)}")
    if unexpected:
        problems.append(f"{_count(len(unexpected), 'unexpected key')}: {first_keys(unexpected)}")
    if misshaped:
        label = _count(len(misshaped), "shape mismatch", "shape mismatches")
        problems.append(f"{label}: {first_keys(misshaped)}")
    if problems:
        raise CheckpointError(path, f"does not match {what}: " + "; ".join(problems))


def _shape_of(value: torch.Tensor | torch.Size | Iterable[int]) -> torch.Size:
    return value.shape if isinstance(value, torch.Tensor) else torch.Size(value)
