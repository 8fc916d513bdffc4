"""The built-in default model's files and names, so the first command works with nothing
downloaded (light: no torch; the CLI checks names with it before loading anything).

The package ships a miniature world's models in `builtin/data/` (built by
`python -m animatediff.world.build`, see the README): a tiny Stable-Diffusion-1.5-architecture
base, a motion module, a domain adapter, personal styles, MotionLoRAs and a few-step student of
the motion module, found by name through `manifest()`. `builtin.model` resolves the default model: the shipped one, or (a source tree
without the data) a tiny model with *random* weights built in code from a fixed seed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import UsageError

PACKAGE_DATA = Path(__file__).parent / "data"
BUILD_VERSION = "random-v1"
SEED = 0
WORDS = (
    "a an the on in of and with moving growing shrinking turning zoom pan left right up down "
    "red green blue yellow white black orange purple circle square triangle star background "
    "small big fast slow best quality worst low bad"
).split()


@dataclass(frozen=True)
class BuiltinModel:
    base: Path
    motion_module: Path
    trained: bool


def manifest() -> dict:
    """The shipped extras by name: `personal` styles (kind `checkpoint`: a single-file model;
    `lora`: a kohya LoRA), `motion_loras` and `motion_modules` (few-step students distilled from
    the built-in motion module: `file`, `steps`, and `adapter` when an image-layer LoRA was
    distilled with it); empty when only the random model exists."""
    file = PACKAGE_DATA / "manifest.json"
    data = json.loads(file.read_text()) if file.exists() else {}
    return {"personal": {}, "motion_loras": {}, "motion_modules": {}, **data}


def _named(section: str, name: str, what: str) -> dict:
    entries = manifest().get(section, {})
    if name not in entries:
        known = ", ".join(entries) or "none (the built-in model is not installed)"
        raise UsageError(f"no built-in {what} named {name!r}; built-in: {known}")
    return {**entries[name], "path": PACKAGE_DATA / entries[name]["file"]}


def personal(name: str) -> tuple[str, Path]:
    """(kind, path) of a built-in personal style: kind "checkpoint" or "lora"."""
    entry = _named("personal", name, "personal style")
    return entry["kind"], entry["path"]


def motion_lora(name: str) -> Path:
    return _named("motion_loras", name, "MotionLoRA")["path"]


def motion_lora_file(name_or_path: str) -> str:
    """A MotionLoRA argument as a file: an existing path as it is, else a built-in name's file,
    else unchanged (so that loading it names the missing file)."""
    if not Path(name_or_path).exists() and name_or_path in manifest()["motion_loras"]:
        return str(motion_lora(name_or_path))
    return name_or_path


def motion_module(name: str) -> tuple[Path, Path | None]:
    """(motion module, its image-layer LoRA or None) of a built-in few-step motion module."""
    entry = _named("motion_modules", name, "motion module")
    lora = entry.get("adapter")
    return entry["path"], None if lora is None else PACKAGE_DATA / lora


def named_motion_module(spec, adapter=None) -> tuple:
    """`(motion_module, adapter)` as `AnimationPipeline.load` takes them, with a built-in motion
    module's name (`animatediff models`) replaced by its file and, when it was distilled with an
    image-layer LoRA, that LoRA as the adapter at scale 1 (as `animatediff evaluate
    --student-adapter` loads it). An existing path, another name or an object: unchanged.
    UsageError: the named module brings its LoRA and another adapter was given."""
    if not isinstance(spec, str) or Path(spec).exists() or spec not in manifest()["motion_modules"]:
        return spec, adapter
    path, lora = motion_module(spec)
    if lora is None:
        return str(path), adapter
    if adapter is not None:
        raise UsageError(
            f"the built-in motion module {spec!r} brings its image-layer LoRA as the adapter; "
            f"it cannot be combined with another adapter"
        )
    return str(path), (str(lora), 1.0)


def adapter() -> Path | None:
    """The built-in domain adapter (the motion module was trained with it applied)."""
    path = PACKAGE_DATA / "domain_adapter.safetensors"
    return path if path.exists() else None


def baseline() -> tuple[Path, Path] | None:
    """(UNet folder, motion module) of the ablation that also trained the image layers."""
    folder = PACKAGE_DATA / "baseline"
    if not (folder / "motion_module.safetensors").exists():
        return None
    return folder / "unet", folder / "motion_module.safetensors"


def shipped() -> BuiltinModel | None:
    """The shipped trained model's paths, or None when the package has no data."""
    if (PACKAGE_DATA / "base" / "model_index.json").exists():
        return BuiltinModel(PACKAGE_DATA / "base", PACKAGE_DATA / "motion_module.safetensors", True)
    return None


def cache_dir() -> Path:
    root = os.environ.get("ANIMATEDIFF_CACHE") or Path.home() / ".cache" / "animatediff"
    return Path(root) / f"builtin-{BUILD_VERSION}"


def _byte_chars() -> list[str]:
    """CLIP's byte-level alphabet: printable bytes as themselves, the rest shifted past 255."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = (b for b in range(256) if b not in printable)
    shifted = {b: 256 + i for i, b in enumerate(extra)}
    return [chr(b) if b in printable else chr(shifted[b]) for b in range(256)]


def write_word_tokenizer(folder: Path, words: tuple[str, ...] = WORDS) -> None:
    """A CLIP BPE tokenizer whose merges spell out `words`; other text falls back to characters."""
    chars = _byte_chars()
    vocab = chars + [c + "</w>" for c in chars]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merge = f"{current} {piece}"
            current = current + piece
            if merge not in merges:
                merges.append(merge)
                vocab.append(current)
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(
        json.dumps({t: i for i, t in enumerate(dict.fromkeys(vocab))})
    )
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "model_max_length": 77,
                "bos_token": "<|startoftext|>",
                "eos_token": "<|endoftext|>",
                "unk_token": "<|endoftext|>",
                "pad_token": "<|endoftext|>",
                "do_lower_case": True,
                "tokenizer_class": "CLIPTokenizer",
            }
        )
    )
