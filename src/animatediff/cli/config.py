"""The official AnimateDiff prompt-config YAML (`configs/prompts/*.yaml`), read unchanged.

Two shapes exist: a list of entries (v3 configs) or a mapping of named entries (v1/v2 configs).
Each entry yields one run per motion module and per prompt; seeds pair with prompts in order.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path

import yaml

KNOWN_KEYS = {
    "dreambooth_path",
    "lora_model_path",
    "lora_alpha",
    "motion_module",
    "motion_module_lora_configs",
    "adapter_lora_path",
    "adapter_lora_scale",
    "domain_lora_scale",
    "inference_config",
    "seed",
    "steps",
    "guidance_scale",
    "prompt",
    "n_prompt",
    "W",
    "H",
    "L",
}
# This project's additions, spelled as the pipeline's keyword arguments.
SAMPLING_KEYS = {
    "context_length",
    "context_overlap",
    "context_stride",
    "context_schedule",
    "context_fuse",
    "context_views",
    "prompt_head",
    "prompt_tail",
    "prompt_interpolation",
    "freenoise",
    "freeinit_iterations",
    "motion_scale",
}
# Control and init inputs, spelled as the pipeline's keyword arguments (paths relative to the
# working directory or to the config's folder).
INPUT_KEYS = {
    "control_images",
    "control_frames",
    "control_scale",
    "control_sample",
    "init_image",
    "init_video",
    "strength",
}
# The official SparseCtrl keys (configs/prompts/v3/*.yaml); `controlnet_config` is not needed:
# the encoder's kind (RGB or scribble) is read from the file.
OFFICIAL_SPARSECTRL = {
    "controlnet_path": "sparsectrl",
    "controlnet_images": "control_images",
    "controlnet_image_indexs": "control_frames",
}
MODEL_KEYS = {"sparsectrl", "controlnets", "controlnet_config"}


class ConfigError(ValueError):
    pass


@dataclass
class Run:
    """One generation: the models to load and the sampling settings."""

    name: str
    motion_module: str
    prompt: str | dict  # a dict is a prompt map (prompt travel)
    negative_prompt: str
    seed: int
    personal: str | None = None
    loras: list[tuple[str, float]] = field(default_factory=list)
    motion_loras: list[tuple[str, float]] = field(default_factory=list)
    adapter: tuple[str, float] | None = None
    motion_version: str | None = None
    steps: int = 25
    guidance_scale: float = 7.5
    width: int | None = None  # None: the model's native size
    height: int | None = None
    num_frames: int | None = 16  # None: the init video's length
    num_videos: int = 1
    sampling: dict = field(default_factory=dict)  # context windows, FreeInit, ... (pipeline kwargs)
    sparsectrl: str | None = None
    controlnets: list[dict] = field(default_factory=list)  # {path, images, scale, start, end}
    inputs: dict = field(default_factory=dict)  # control images, init image/video (pipeline kwargs)

    def model_key(self) -> tuple:
        """Runs with the same key share a loaded pipeline."""
        return (
            self.motion_module,
            self.personal,
            tuple(self.loras),
            tuple(self.motion_loras),
            self.adapter,
            self.motion_version,
            self.sparsectrl,
            tuple(c["path"] for c in self.controlnets),
        )

    def call_kwargs(self) -> dict:
        """The pipeline's keyword arguments for this run's control and init inputs."""
        kwargs = dict(self.inputs)
        if self.controlnets:
            kwargs["controlnet_images"] = [c["images"] for c in self.controlnets]
            for key in ("scale", "start", "end"):
                default = 0.0 if key == "start" else 1.0
                kwargs[f"controlnet_{key}"] = [float(c.get(key, default)) for c in self.controlnets]
        return kwargs


def _path(value: str | None, root: Path) -> str | None:
    """Official configs hold paths relative to the repository they run from (the cwd); fall
    back to the config's own folder."""
    if not value:
        return None
    if Path(value).exists() or Path(value).is_absolute():
        return value
    beside = root / value
    return str(beside) if beside.exists() else value


def version_from_inference_config(value: str | None, root: Path) -> str | None:
    """inference-v1.yaml -> "v1" etc.; read the file's UNet settings when it exists."""
    if not value:
        return None
    path = Path(_path(value, root))
    if path.exists():
        kwargs = (_read_yaml(path) or {}).get("unet_additional_kwargs", {})
        if kwargs.get("motion_module_mid_block"):
            return "v2"
        return "v3" if kwargs.get("use_inflated_groupnorm") else "v1"
    for version in ("v1", "v2", "v3"):
        if version in path.stem:
            return version
    return None


def _read_yaml(path: Path):
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None


def _entries(data) -> list[tuple[str, dict]]:
    if isinstance(data, list):
        return [(f"{i}", e) for i, e in enumerate(data)]
    if isinstance(data, dict):
        return [(str(name), e) for name, e in data.items()]
    raise ConfigError("a prompt config is a list of entries (or a mapping of named entries)")


def _as_list(value) -> list:
    return value if isinstance(value, list) else [value]


def load_runs(path: str | Path, base_seed: int | None = None) -> list[Run]:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config not found: {path}")
    data = _read_yaml(path)
    runs = []
    for name, entry in _entries(data):
        if not isinstance(entry, dict):
            raise ConfigError(f"{path}: entry {name} is not a mapping")
        runs += _entry_runs(name, entry, path.parent, path)
    return runs


def _entry_runs(name: str, e: dict, root: Path, path: Path) -> list[Run]:
    known = KNOWN_KEYS | SAMPLING_KEYS | INPUT_KEYS | MODEL_KEYS | set(OFFICIAL_SPARSECTRL)
    unknown = set(e) - known - {"prompt_map"}
    if unknown:
        warnings.warn(
            f"{path}: entry {name}: ignoring unknown keys {sorted(unknown)}", stacklevel=2
        )
    if "motion_module" not in e or not ("prompt" in e or "prompt_map" in e):
        raise ConfigError(
            f"{path}: entry {name} needs 'motion_module' and 'prompt' (or 'prompt_map')"
        )
    prompts = [e["prompt_map"]] if "prompt_map" in e else _as_list(e["prompt"])
    negatives = _as_list(e.get("n_prompt") or [""])
    if len(negatives) == 1:
        negatives = negatives * len(prompts)
    seeds = _as_list(e.get("seed", -1))
    lora = _path(e.get("lora_model_path"), root)
    adapter = _path(e.get("adapter_lora_path"), root)
    scale = e.get("adapter_lora_scale", e.get("domain_lora_scale", 1.0))
    common = dict(
        personal=_path(e.get("dreambooth_path"), root),
        loras=[(lora, float(e.get("lora_alpha", 0.8)))] if lora else [],
        motion_loras=[
            (_path(c["path"], root), float(c.get("alpha", 1.0)))
            for c in e.get("motion_module_lora_configs") or []
        ],
        adapter=(adapter, float(scale)) if adapter else None,
        motion_version=version_from_inference_config(e.get("inference_config"), root),
        steps=int(e.get("steps", 25)),
        guidance_scale=float(e.get("guidance_scale", 7.5)),
        width=int(e.get("W", 512)),
        height=int(e.get("H", 512)),
        num_frames=int(e["L"]) if "L" in e else (None if "init_video" in e else 16),
        sampling={k: e[k] for k in SAMPLING_KEYS if k in e},
        **_control(e, root, f"{path}: entry {name}"),
    )
    runs = []
    for module in _as_list(e["motion_module"]):
        for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
            seed = int(seeds[i % len(seeds)])
            runs.append(
                Run(
                    name=f"{name}-{i}",
                    motion_module=_path(module, root),
                    prompt=prompt,
                    negative_prompt=negative,
                    seed=seed,
                    **common,
                )
            )
    return runs


def _paths(value, root: Path):
    return [_path(v, root) for v in value] if isinstance(value, list) else _path(value, root)


def _control(e: dict, root: Path, where: str) -> dict:
    """SparseCtrl, ControlNet and init settings of one entry (official keys included)."""
    e = dict(e)
    if "controlnet_images" in e and "controlnet_path" not in e:
        raise ConfigError(
            f"{where}: controlnet_images is the official SparseCtrl key (with controlnet_path); "
            "standard ControlNets go in controlnets: [{path, images, scale, start, end}]"
        )
    for official, ours in OFFICIAL_SPARSECTRL.items():
        if official in e:
            e.setdefault(ours, e.pop(official))
    inputs = {k: e[k] for k in INPUT_KEYS if k in e}
    for key in ("control_images", "init_image", "init_video"):
        if key in inputs:
            inputs[key] = _paths(inputs[key], root)
    controlnets = []
    for c in e.get("controlnets") or []:
        if not isinstance(c, dict) or not {"path", "images"} <= set(c):
            raise ConfigError(f"{where}: each of controlnets needs path and images, got {c!r}")
        extra = set(c) - {"path", "images", "scale", "start", "end"}
        if extra:
            raise ConfigError(f"{where}: unknown controlnets keys {sorted(extra)}")
        controlnets.append(
            {**c, "path": _path(c["path"], root), "images": _paths(c["images"], root)}
        )
    return dict(sparsectrl=_path(e.get("sparsectrl"), root), controlnets=controlnets, inputs=inputs)
