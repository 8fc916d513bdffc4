"""The models a page may choose from: the built-in ones and what lies under the model folders.

Files are recognised by their content (`checkpoints.detect.describe`), not by their names, and
offered under opaque keys. A request names a key, never a path: `ModelLibrary.get` looks the key
up in the last scan, so nothing outside the configured folders can be opened through the page.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .. import builtin
from ..builtin.model import builtin_model
from ..checkpoints.detect import describe
from ..checkpoints.io import CheckpointError, load_state_dict

log = logging.getLogger(__name__)

WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
MAX_DEPTH = 6  # folders below a model folder that are searched
BUILTIN = "builtin:"

# What the page calls each category, and the detected kinds that belong to it.
CATEGORIES = {
    "base": ("diffusers pipeline folder",),
    "personal": ("single-file SD checkpoint",),
    "vae": ("VAE",),
    "lora": ("image LoRA (kohya)", "attention LoRA (domain adapter / image)"),
    "motion_module": ("motion module",),
    "motion_lora": ("MotionLoRA",),
    "adapter": ("attention LoRA (domain adapter / image)",),
    "sparsectrl": ("SparseCtrl / motion ControlNet",),
    "controlnet": ("ControlNet",),
}


@dataclass(frozen=True)
class ModelEntry:
    """One choosable model. `key` is what the page sends back; `builtin` the built-in name
    (the CLI accepts it in place of the path) or None for files under a model folder."""

    key: str
    label: str
    category: str
    path: Path
    builtin: str | None = None
    kind: str = ""  # for a built-in personal style: "checkpoint" or "lora"
    info: dict = field(default_factory=dict, compare=False)


class UnknownModel(ValueError):
    """A key that is not in the library (a stale page, or a forged request)."""


class ModelLibrary:
    """Scans the model folders; `choices(category)` for the page, `get(key)` to load."""

    def __init__(
        self, folders: Iterable[str | os.PathLike] = (), cache_file: str | os.PathLike | None = None
    ):
        """`cache_file`: a JSON file remembering what each file is (by path, size and
        modification time), so that a restart does not read every checkpoint again."""
        self.folders = [Path(f).expanduser().resolve() for f in folders]
        for folder in self.folders:
            if not folder.is_dir():
                raise ValueError(f"--models {folder}: not a folder")
        self.cache_file = None if cache_file is None else Path(cache_file)
        self._cache: dict[str, dict] = _read_cache(self.cache_file)  # "path|size|mtime" -> facts
        self._used: set[str] = set()
        self.entries: dict[tuple[str, str], ModelEntry] = {}  # (category, key) -> entry
        self.skipped: list[str] = []  # files that could not be read, with the reason
        self.scan()

    # -- lookup ------------------------------------------------------------------------------
    def choices(self, category: str) -> list[tuple[str, str]]:
        """(label, key) pairs of one category, built-in ones first."""
        if category not in CATEGORIES:
            raise ValueError(f"unknown model category {category!r}")
        return [(e.label, e.key) for (c, _), e in self.entries.items() if c == category]

    def get(self, key: str, category: str) -> ModelEntry:
        """The entry behind a key the page sent; UnknownModel for anything else."""
        entry = self.entries.get((category, key)) if isinstance(key, str) else None
        if entry is None:
            what = category.replace("_", " ")
            raise UnknownModel(f"{what} {str(key)[:80]!r} is not one of the models offered")
        return entry

    # -- scanning ----------------------------------------------------------------------------
    def scan(self) -> None:
        """Rebuild the entries: built-in ones, then every recognised file in the folders."""
        entries = list(builtin_entries())
        self.skipped, self._used = [], set()
        for index, folder in enumerate(self.folders):
            for path in _candidates(folder):
                entries += self._entries_for(index, folder, path)
        self.entries = {(e.category, e.key): e for e in entries}
        self._cache = {k: v for k, v in self._cache.items() if k in self._used}  # drop stale ones
        _write_cache(self.cache_file, self._cache)

    def _entries_for(self, index: int, folder: Path, path: Path) -> list[ModelEntry]:
        facts = self._facts(path)
        if facts is None:
            return []
        relative = path.relative_to(folder).as_posix()
        key = f"{index}:{relative}"
        label = relative if len(self.folders) == 1 else f"{folder.name}/{relative}"
        if facts.get("version"):
            label += f" ({facts['version']})"
        return [
            ModelEntry(key, label, category, path, info=facts)
            for category, kinds in CATEGORIES.items()
            if facts["kind"] in kinds
        ]

    def _facts(self, path: Path) -> dict | None:
        """What `path` is, cached by size and modification time; None when unreadable."""
        try:
            stat = path.stat()
        except OSError:
            return None
        cache_key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}"
        self._used.add(cache_key)
        if cache_key not in self._cache:
            try:
                self._cache[cache_key] = identify(path)
            except (CheckpointError, OSError, ValueError, KeyError) as e:
                self.skipped.append(f"{path}: {e}")
                log.warning("model folder: skipping %s (%s)", path, e)
                return None
        return self._cache[cache_key]


def default_cache_file() -> Path:
    """Beside the built-in model's cache (`ANIMATEDIFF_CACHE`), outside any served folder."""
    return builtin.cache_dir().parent / "ui-model-scan.json"


def _read_cache(file: Path | None) -> dict[str, dict]:
    try:
        data = json.loads(file.read_text()) if file is not None else {}
    except (OSError, ValueError):
        return {}  # missing or damaged: scan again
    return data if isinstance(data, dict) else {}


def _write_cache(file: Path | None, cache: dict[str, dict]) -> None:
    if file is None:
        return
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(cache))
    os.replace(tmp, file)


def identify(path: Path) -> dict:
    """`describe(path)`, plus the standard ControlNets it does not know."""
    if path.is_dir():
        config = path / "config.json"
        if not (path / "model_index.json").exists() and config.exists():
            if json.loads(config.read_text()).get("_class_name") == "ControlNetModel":
                return {"file": str(path), "kind": "ControlNet"}
        facts = describe(path)
    else:
        facts = describe(path)
        if facts["kind"] == "unknown" and _is_controlnet_file(path):
            facts["kind"] = "ControlNet"
    return {k: v for k, v in facts.items() if isinstance(v, (str, int, float, bool, list))}


def _is_controlnet_file(path: Path) -> bool:
    keys = load_state_dict(path).keys()
    diffusers = "controlnet_mid_block.weight" in keys
    original = any(
        k.startswith(("control_model.input_hint_block", "input_hint_block")) for k in keys
    )
    return diffusers or original


def _candidates(folder: Path, depth: int = 0) -> Iterable[Path]:
    """Weight files and model folders under `folder`; a diffusers model folder is one candidate
    and is not searched further. Hidden entries are skipped."""
    try:
        children = sorted(folder.iterdir())
    except OSError:
        return
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            if (child / "model_index.json").exists() or (child / "config.json").exists():
                yield child
            elif depth < MAX_DEPTH:
                yield from _candidates(child, depth + 1)
        elif child.suffix.lower() in WEIGHT_SUFFIXES:
            yield child


def builtin_entries() -> list[ModelEntry]:
    """The built-in model and its named extras: always offered."""
    model = builtin_model()
    entries = [
        ModelEntry(BUILTIN + "base", "built-in", "base", model.base, builtin="base"),
        ModelEntry(
            BUILTIN + "motion_module",
            "built-in (v3)",
            "motion_module",
            model.motion_module,
            builtin="motion_module",
        ),
    ]
    names = builtin.manifest()
    for name in names["personal"]:
        kind, path = builtin.personal(name)
        label = f"{name} (built-in{', LoRA' if kind == 'lora' else ''})"
        entries.append(ModelEntry(BUILTIN + name, label, "personal", path, name, kind))
        if kind == "lora":  # also an image LoRA, with a strength of its own
            entries.append(ModelEntry(BUILTIN + name, f"{name} (built-in)", "lora", path))
    for name in names["motion_loras"]:
        path = builtin.motion_lora(name)
        entries.append(ModelEntry(BUILTIN + name, f"{name} (built-in)", "motion_lora", path, name))
    for name, entry in names.get("motion_modules", {}).items():
        if "adapter" not in entry:  # (one that brings its image LoRA needs the command line)
            label = f"{name} (built-in, {entry['steps']}-step: preset auto)"
            path = builtin.motion_module(name)[0]
            entries.append(ModelEntry(BUILTIN + name, label, "motion_module", path, name))
    if builtin.adapter() is not None:
        entries.append(
            ModelEntry(BUILTIN + "adapter", "built-in", "adapter", builtin.adapter(), "adapter")
        )
    return entries


def native_size(entry: ModelEntry) -> int:
    """The image size a base model was trained at (UNet sample size x VAE factor)."""
    unet = json.loads((entry.path / "unet" / "config.json").read_text())
    vae = json.loads((entry.path / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
