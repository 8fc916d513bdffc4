"""Low-rank adapters: merged into weights (image LoRAs, the domain adapter) or attached with
hooks so they stay removable and trainable (MotionLoRA, adapter training).

A LoRA is described independently of its file format as `{module_path: LoRAPair}`; the
format parsers live in `animatediff.checkpoints.lora`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class LoRAPair:
    """`delta W = scale * up @ down` for one layer; `scale` is the file's own factor
    (alpha / rank for kohya files under the kohya convention, 1 otherwise)."""

    down: torch.Tensor
    up: torch.Tensor
    scale: float = 1.0

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def check_fits(self, weight_shape: torch.Size) -> None:
        """Raise ValueError unless :meth:`delta` fits a weight of `weight_shape`, from the
        shapes alone (the product, the costly part, is computed once, when merging)."""
        (out, rank_up), (rank_down, inner) = self.up.flatten(1).shape, self.down.flatten(1).shape
        if rank_up != rank_down:
            raise ValueError(
                f"up {tuple(self.up.shape)} and down {tuple(self.down.shape)} differ in rank"
            )
        if out * inner != torch.Size(weight_shape).numel():
            raise ValueError(f"LoRA of shape {(out, inner)} does not fit {tuple(weight_shape)}")

    def delta(self, weight_shape: torch.Size) -> torch.Tensor:
        """The weight update, shaped like the target weight (Linear or Conv2d)."""
        self.check_fits(weight_shape)
        up = self.up.flatten(1).float()
        down = self.down.flatten(1).float()
        return ((up @ down) * self.scale).reshape(weight_shape)


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise KeyError(path) from e


@torch.no_grad()
def merge_lora(model: nn.Module, pairs: Mapping[str, LoRAPair], strength: float) -> None:
    """The official merge: `W += strength * scale * up @ down`, permanently."""
    for path, pair in pairs.items():
        weight = get_module(model, path).weight
        weight += (strength * pair.delta(weight.shape)).to(weight)


class LoRALayer(nn.Module):
    """`up(down(x))` for a Linear or Conv2d target; `down` keeps the target's kernel/stride."""

    def __init__(self, target: nn.Module, rank: int, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        if isinstance(target, nn.Linear):
            self.down = nn.Linear(target.in_features, rank, bias=False)
            self.up = nn.Linear(rank, target.out_features, bias=False)
        elif isinstance(target, nn.Conv2d):
            self.down = nn.Conv2d(
                target.in_channels,
                rank,
                target.kernel_size,
                target.stride,
                target.padding,
                target.dilation,
                bias=False,
            )
            self.up = nn.Conv2d(rank, target.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA supports Linear and Conv2d layers, not {type(target).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=5**0.5)
        nn.init.zeros_(self.up.weight)  # starts as the identity: training begins at the base model

    @property
    def rank(self) -> int:
        return self.up.weight.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x.to(self.down.weight.dtype))) * self.scale

    def load_pair(self, pair: LoRAPair) -> None:
        with torch.no_grad():
            self.down.weight.copy_(pair.down.reshape(self.down.weight.shape))
            self.up.weight.copy_(pair.up.reshape(self.up.weight.shape))
        self.scale = pair.scale

    def pair(self) -> LoRAPair:
        return LoRAPair(self.down.weight.detach(), self.up.weight.detach(), self.scale)


def _key(path: str) -> str:
    return path.replace(".", "/")  # ModuleDict keys may not contain dots


class LoRASet(nn.Module):
    """A set of LoRA layers for one model, attached with forward hooks (nothing merged).

    `attach(model)` adds `strength * up(down(x))` to each target's output; `detach()` removes it
    exactly. The set's own parameters are the only trainable ones it introduces.
    """

    def __init__(self, layers: Mapping[str, LoRALayer] | None = None, strength: float = 1.0):
        super().__init__()
        self.layers = nn.ModuleDict({_key(p): layer for p, layer in (layers or {}).items()})
        self.strength = strength
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._model: nn.Module | None = None

    @classmethod
    def create(cls, model: nn.Module, targets: list[str], rank: int) -> LoRASet:
        """Fresh, zero-effect layers (up = 0) on `targets`, for training."""
        return cls({p: LoRALayer(get_module(model, p), rank) for p in targets})

    @classmethod
    def from_pairs(cls, model: nn.Module, pairs: Mapping[str, LoRAPair], strength: float = 1.0):
        layers = {}
        for path, pair in pairs.items():
            layer = LoRALayer(get_module(model, path), pair.rank)
            layer.load_pair(pair)
            layers[path] = layer
        return cls(layers, strength).to(next(model.parameters()).device)

    def items(self) -> Iterator[tuple[str, LoRALayer]]:
        for key, layer in self.layers.items():
            yield key.replace("/", "."), layer

    def pairs(self) -> dict[str, LoRAPair]:
        return {path: layer.pair() for path, layer in self.items()}

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, model: nn.Module) -> LoRASet:
        if self._handles:
            raise RuntimeError("this LoRA is already attached")
        for path, layer in self.items():
            self._handles.append(get_module(model, path).register_forward_hook(self._hook(layer)))
        self._model = model
        return self

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._model = None

    def _hook(self, layer: LoRALayer):
        def hook(module, args, output):
            if self.strength == 0:
                return output
            return output + (layer(args[0]) * self.strength).to(output.dtype)

        return hook


@contextlib.contextmanager
def merged(sets: Iterable[LoRASet]) -> Iterator[None]:
    """Within the block, the attached LoRA sets are merged into their model's weights
    (`W += strength * delta`, their hooks off: no extra work per call); on exit the original
    weights are copied back and the hooks re-attached, so they stay removable and re-weightable."""
    active = [s for s in sets if s.attached]
    originals: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    with torch.no_grad():
        for lora in active:
            for path, layer in lora.items():
                weight = get_module(lora._model, path).weight
                originals.setdefault(id(weight), (weight, weight.detach().clone()))
                delta = lora.strength * layer.pair().delta(weight.shape)
                weight += delta.to(weight.device, weight.dtype)
    models = [(lora, lora._model) for lora in active]
    for lora in active:
        lora.detach()
    try:
        yield
    finally:
        with torch.no_grad():
            for weight, original in originals.values():
                weight.copy_(original)
        for lora, model in models:
            lora.attach(model)
