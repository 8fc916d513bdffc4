"""Textual-inversion embeddings (SD1.5): the files A1111, ComfyUI and diffusers users share.

Formats read (by content, whatever the suffix):
- A1111 / original LDM `.pt`: ``{"string_to_param": {"*": (n, 768)}, "name": ..., "step": ...}``
  (in LDM's own files `string_to_param` is a ``torch.nn.ParameterDict``: the one class the safe
  unpickler is allowed to rebuild here, since it holds nothing but tensors);
- `.safetensors` with one tensor ``emb_params`` (n, 768) (A1111's safetensors export, e.g.
  EasyNegative);
- diffusers' ``learned_embeds.bin``/``.safetensors``: ``{"<token>": (768,) or (n, 768)}``.

An embedding is used by writing its name (the file stem, as in A1111) in a prompt; its n vectors
then take the place of the name and count as n tokens (see `pipeline/prompt.py`). SDXL files
(``clip_g``/``clip_l``) and widths other than the text encoder's are refused.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import UsageError
from .io import CheckpointError, StrPath, first_keys, load_object

__all__ = ["MAX_VECTORS", "Embedding", "TextualInversions", "read_embedding"]

# A prompt chunk holds 75 tokens, and an embedding is never split between chunks.
MAX_VECTORS = 75


@dataclass(frozen=True, eq=False)  # eq=False: compared by identity, not tensor values
class Embedding:
    """One textual inversion: `name` in a prompt stands for the rows of `vectors` (n, width)."""

    name: str
    vectors: torch.Tensor
    path: Path | None = None
    trained_name: str | None = None  # the name stored in an A1111 file, if any (not used)

    @property
    def width(self) -> int:
        return self.vectors.shape[1]


def read_embedding(path: StrPath, name: str | None = None) -> Embedding:
    """Read a textual-inversion file; its prompt word is `name`, by default the file stem."""
    file = Path(path)
    obj = load_object(file, allowed=(torch.nn.ParameterDict,))
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            file, f"not a textual-inversion embedding (it holds a {type(obj).__name__})"
        )
    if "clip_g" in obj or "clip_l" in obj:
        raise CheckpointError(
            file, "an SDXL embedding (clip_g/clip_l); only SD1.5 embeddings are supported"
        )
    trained = obj.get("name") if isinstance(obj.get("name"), str) else None
    vectors = _only_tensor(file, _parameters(file, obj))
    return Embedding(name or file.stem, _as_matrix(file, vectors), file, trained)


def _parameters(file: Path, obj: Mapping) -> Mapping:
    if "string_to_param" not in obj:  # emb_params, or diffusers' {"<token>": tensor}
        return obj
    params = obj["string_to_param"]
    params = getattr(params, "_parameters", params)  # LDM's ParameterDict
    if not isinstance(params, Mapping):
        raise CheckpointError(file, "string_to_param is not a mapping of tensors")
    return params


def _only_tensor(file: Path, params: Mapping) -> torch.Tensor:
    tensors = {k: v for k, v in params.items() if isinstance(v, torch.Tensor)}
    if len(tensors) != 1:
        what = "no tensor" if not tensors else f"{len(tensors)} tensors ({first_keys(tensors)})"
        raise CheckpointError(
            file, f"not a textual-inversion embedding: expected one tensor of vectors, found {what}"
        )
    return next(iter(tensors.values()))


def _as_matrix(file: Path, t: torch.Tensor) -> torch.Tensor:
    t = t.detach()
    if t.ndim == 1:  # diffusers' single-vector files
        t = t.unsqueeze(0)
    if t.ndim != 2 or not t.is_floating_point() or t.shape[0] == 0:
        raise CheckpointError(
            file,
            f"embedding vectors must be a float (n, width) tensor, got {t.dtype} {list(t.shape)}",
        )
    if t.shape[0] > MAX_VECTORS:
        raise CheckpointError(
            file, f"embedding has {t.shape[0]} vectors; at most {MAX_VECTORS} fit a prompt chunk"
        )
    return t.float().contiguous()


class TextualInversions:
    """The embeddings loaded for one text encoder (of hidden size `width`), by name.

    Names are matched case-insensitively (CLIP lowercases prompts), so two names that differ only
    in case cannot both be loaded.
    """

    def __init__(self, width: int) -> None:
        self.width = width
        self._items: dict[str, Embedding] = {}

    def load(self, path: StrPath, name: str | None = None) -> Embedding:
        """Read a file (see the module docstring) and add it; returns the embedding."""
        return self.add(read_embedding(path, name))

    def add(self, embedding: Embedding) -> Embedding:
        if embedding.width != self.width:
            problem = (
                f"embedding width {embedding.width} does not match the text encoder's "
                f"{self.width} (an embedding for another model family?)"
            )
            if embedding.path is None:
                raise ValueError(f"embedding {embedding.name!r}: {problem}")
            raise CheckpointError(embedding.path, problem)
        name = embedding.name
        if not name.strip():
            raise UsageError(f"embedding from {embedding.path}: the name is empty")
        if name.lower() in self._items:
            raise UsageError(
                f"an embedding named {name!r} is already loaded (embeddings are named by file name)"
            )
        self._items[name.lower()] = embedding
        return embedding

    def remove(self, name: str) -> None:
        del self._items[name.lower()]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._items

    def __getitem__(self, name: str) -> Embedding:
        return self._items[name.lower()]

    def __iter__(self) -> Iterator[Embedding]:
        return iter(list(self._items.values()))

    def __len__(self) -> int:
        return len(self._items)
