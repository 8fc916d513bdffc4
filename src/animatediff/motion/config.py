"""One frozen description of a motion module: what differs between v1, v2 and v3."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

VERSIONS = ("v1", "v2", "v3")


@dataclass(frozen=True)
class MotionModuleConfig:
    """Shape and behaviour of a set of motion modules for one UNet.

    The released modules differ in three ways that change the computation:
    v2 adds a module in the mid block; v1 was trained with the image model's resnet and output
    GroupNorms pooling statistics over all frames of a video (v2/v3 normalise each frame alone);
    and the stored positional-encoding length (24 for v1, 32 for v2/v3), which only bounds how
    many frames the official code accepts: the encoding is a fixed sinusoid, so any length works.
    """

    version: str = "v3"
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    mid_block: bool = False
    up_blocks: bool = True  # SparseCtrl's encoder has motion modules in its down blocks only
    num_attention_heads: int = 8
    num_transformer_blocks: int = 1
    attention_block_types: tuple[str, ...] = ("Temporal_Self", "Temporal_Self")
    max_frames: int = 32
    norm_num_groups: int = 32
    temporal_attention_dim_div: int = 1
    groupnorm_across_frames: bool = False
    zero_init: bool = True
    # Fraction of the noise variance shared by all frames of a clip in the noise the module was
    # trained with (a mixed noise prior as in PYoCo, Ge et al. 2023): 0 for the released modules.
    # Sampling draws its initial noise the same way unless told otherwise.
    shared_noise: float = 0.0

    def __post_init__(self) -> None:
        for kind in self.attention_block_types:
            if kind != "Temporal_Self":
                raise ValueError(f"unsupported attention block type {kind!r} (only Temporal_Self)")
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "attention_block_types", tuple(self.attention_block_types))
        if not 0 <= self.shared_noise < 1:
            raise ValueError(f"shared_noise must be in [0, 1), got {self.shared_noise}")

    @classmethod
    def preset(cls, version: str, **overrides) -> MotionModuleConfig:
        """The configuration of a released module (official inference-vN.yaml)."""
        if version not in VERSIONS:
            raise ValueError(
                f"unknown motion module version {version!r}; expected one of {VERSIONS}"
            )
        base = {
            "v1": dict(mid_block=False, max_frames=24, groupnorm_across_frames=True),
            "v2": dict(mid_block=True, max_frames=32, groupnorm_across_frames=False),
            "v3": dict(mid_block=False, max_frames=32, groupnorm_across_frames=False),
        }[version]
        return cls(version=version, **{**base, **overrides})

    def replace(self, **changes) -> MotionModuleConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> MotionModuleConfig:
        data = json.loads(text)
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown motion module config keys: {unknown}")
        return cls(**data)
