"""Runs from files: the official AnimateDiff prompt-config YAML (`configs/prompts/*.yaml`, read
unchanged) and the settings JSON written beside every output (`--from`, which replays it).

Two shapes of prompt config exist: a list of entries (v3 configs) or a mapping of named entries
(v1/v2 configs). Each entry yields one run per motion module and per prompt; seeds pair with
prompts in order. Besides the official keys an entry may hold any generation option or model
option by its name (`animatediff.options`). Everything is checked here, before any model loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ..builtin import PACKAGE_DATA
from ..errors import ConfigError
from ..options import OWNER, ModelOptions, OptionError, Options, as_list
from ..provenance import SettingsReadError, read_settings

# Official keys with a direct equivalent among the options.
OFFICIAL_OPTIONS = {
    "steps": "num_inference_steps",
    "guidance_scale": "guidance_scale",
    "W": "width",
    "H": "height",
    "L": "num_frames",
}
# The official SparseCtrl keys (with controlnet_path); `controlnet_images` is also this
# project's name for standard ControlNets' frames, so it is read as SparseCtrl's only beside
# controlnet_path. Standard ControlNets go in `controlnets: [{path, images, ...}]`.
OFFICIAL_SPARSECTRL = {
    "controlnet_images": "control_images",
    "controlnet_image_indexs": "control_frames",
}
# Official keys read by hand below (models, prompts, seeds).
OFFICIAL_OTHER = {
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
    "prompt",
    "n_prompt",
    "controlnet_path",
    "controlnet_config",  # not needed: the encoder's kind is read from the file
    "prompt_map",
}
log = logging.getLogger("animatediff")
MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelOptions)}
PATH_OPTIONS = (
    "control_images",
    "controlnet_images",
    "init_image",
    "init_video",
    "ip_adapter_images",
)


@dataclass(frozen=True)
class Run:
    """One generation: the models to load, the prompt, and the options set for it."""

    name: str
    models: ModelOptions
    prompt: str | dict  # a dict is a prompt map (prompt travel)
    negative_prompt: str | dict = ""
    settings: dict[str, Any] = field(default_factory=dict)  # flat option names -> values
    recorded: dict[str, str] = field(default_factory=dict)  # --from: file -> sha256 it had

    def options(self, overrides: dict[str, Any] | None = None) -> Options:
        return Options.build({**self.settings, **(overrides or {})})


def read_yaml(path: Path) -> Any:
    """YAML (or JSON) from a file; a missing file, a folder or bad syntax is a ConfigError."""
    if not path.is_file():
        raise ConfigError(f"{path}: {'is a folder' if path.is_dir() else 'not found'}")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({' '.join(str(e).split())})") from None


def load_runs(path: str | Path) -> list[Run]:
    """Every run of a prompt config, checked."""
    path = Path(path)
    data = read_yaml(path)
    if isinstance(data, list):
        entries = [(f"{i}", e) for i, e in enumerate(data)]
    elif isinstance(data, dict):
        entries = [(str(name), e) for name, e in data.items()]
    else:
        raise ConfigError(f"{path}: a prompt config is a list of entries or a mapping of them")
    runs = []
    for name, entry in entries:
        where = f"{path}: entry {name}"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where} is not a mapping")
        try:
            runs += _entry_runs(name, entry, path.parent)
        except (OptionError, ConfigError) as e:
            raise ConfigError(f"{where}: {e}") from None
    return runs


def _entry_runs(name: str, e: dict, root: Path) -> list[Run]:
    known = (
        set(OFFICIAL_OPTIONS)
        | set(OFFICIAL_SPARSECTRL)
        | OFFICIAL_OTHER
        | set(OWNER)
        | MODEL_FIELDS
    )
    for key in sorted(set(e) - known, key=str):
        # forks of the official script add keys of their own: ignore them, but say so
        close = difflib.get_close_matches(str(key), sorted(known), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        log.warning("entry %s: ignoring unknown key %r%s", name, key, hint)
    if "motion_module" not in e or not ("prompt" in e or "prompt_map" in e):
        raise ConfigError("needs 'motion_module' and 'prompt' (or 'prompt_map')")
    e = _controlnet_entries(_sparsectrl_entries(e))
    settings = _settings(e, root)
    Options.build(settings)  # checked now, before any model loads
    prompts, negatives, modules = _prompts(e)
    seeds = _seeds(e.get("seed", -1))
    runs = []
    for module in modules:
        models = _models(e, module, root)
        for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
            seed = seeds[i % len(seeds)]
            extra = {} if seed is None else {"seed": seed}
            runs.append(Run(f"{name}-{i}", models, prompt, negative, {**settings, **extra}))
    return runs


def _prompts(e: dict) -> tuple[list, list, list[str]]:
    """(prompts, one negative prompt each, motion modules), checked."""
    prompts = [e["prompt_map"]] if "prompt_map" in e else as_list(e["prompt"])
    modules = as_list(e["motion_module"])
    if not prompts or not modules:
        raise ConfigError(f"{'prompt' if not prompts else 'motion_module'}: an empty list")
    for module in modules:
        if not isinstance(module, str) or not module:
            raise ConfigError(f"motion_module: expected a path, got {module!r}")
    negatives = as_list(e.get("n_prompt") or [""])
    negatives = negatives * len(prompts) if len(negatives) == 1 else negatives
    if len(negatives) != len(prompts):
        raise ConfigError(f"{len(negatives)} n_prompt for {len(prompts)} prompts")
    for i, (prompt, negative) in enumerate(zip(prompts, negatives)):
        if not isinstance(prompt, str | dict):
            raise ConfigError(f"prompt {i}: expected text, got {prompt!r}")
        if not isinstance(negative, str | dict):
            raise ConfigError(f"n_prompt {i}: expected text, got {negative!r}")
    return prompts, negatives, modules


def _sparsectrl_entries(e: dict) -> dict:
    """The official SparseCtrl keys under this project's names."""
    if "controlnet_path" not in e:
        if "controlnet_images" in e:
            raise ConfigError(
                "controlnet_images is the official SparseCtrl key (with controlnet_path); "
                "standard ControlNets go in controlnets: [{path, images, scale, start, end}]"
            )
        return e
    return {OFFICIAL_SPARSECTRL.get(k, k): v for k, v in e.items()}


def _controlnet_entries(e: dict) -> dict:
    """`controlnets: [{path, images, scale, start, end}]` (one entry per ControlNet) -> the
    model list and the per-ControlNet options."""
    nets = e.get("controlnets")
    if not isinstance(nets, list) or not all(isinstance(c, dict) for c in nets):
        return e
    keys = {"path", "images", "scale", "start", "end"}
    for c in nets:
        if not {"path", "images"} <= set(c) or set(c) - keys:
            raise ConfigError(
                f"controlnets: each needs path and images (and may have scale, start, end), got {c!r}"
            )
    e = dict(
        e, controlnets=[c["path"] for c in nets], controlnet_images=[c["images"] for c in nets]
    )
    for key, default in (("scale", 1.0), ("start", 0.0), ("end", 1.0)):
        e[f"controlnet_{key}"] = [c.get(key, default) for c in nets]
    return e


def _seeds(value: Any) -> list[int | None]:
    """`seed`: a number or a list of them, paired with the prompts in turn; -1: random."""
    seeds = as_list(value)
    if not seeds:
        raise ConfigError("seed: an empty list (give a number, a list of numbers, or -1)")
    # each checked as the option (an OptionError names the value)
    return [None if s in (-1, None) else Options.build({"seed": s}).sampling.seed for s in seeds]


def _settings(e: dict, root: Path) -> dict[str, Any]:
    """The entry's generation options by their names (official keys translated)."""
    settings = {OFFICIAL_OPTIONS.get(k, k): v for k, v in e.items()}
    settings = {k: v for k, v in settings.items() if k in OWNER and k != "seed"}
    for key in PATH_OPTIONS:
        if key in settings:
            settings[key] = _paths(settings[key], root, key)
    if "context_length" in settings and settings["context_length"] is None:
        settings["context_length"] = 0
    return settings


def _models(e: dict, motion_module: str, root: Path) -> ModelOptions:
    """The entry's models: official keys, then this project's own model keys."""
    lora = _path(e.get("lora_model_path"), root, "lora_model_path")
    adapter = _path(e.get("adapter_lora_path"), root, "adapter_lora_path")
    scale = e.get("adapter_lora_scale", e.get("domain_lora_scale", 1.0))
    loras = e.get("motion_module_lora_configs") or []
    if not isinstance(loras, list) or not all(isinstance(c, dict) and "path" in c for c in loras):
        raise ConfigError("motion_module_lora_configs: expected a list of {path, alpha}")
    fields = dict(
        motion_module=_path(motion_module, root, "motion_module"),
        personal=_path(e.get("dreambooth_path"), root, "dreambooth_path"),
        loras=[(lora, e.get("lora_alpha", 0.8))] if lora else [],
        motion_loras=[
            (_path(c["path"], root, "motion_module_lora_configs"), c.get("alpha", 1.0))
            for c in loras
        ],
        adapter=(adapter, scale) if adapter else None,
        motion_version=version_from_inference_config(e.get("inference_config"), root),
        sparsectrl=_path(e.get("controlnet_path"), root, "controlnet_path"),
    )
    ours = {k: v for k, v in e.items() if k in MODEL_FIELDS and k != "motion_module"}
    if "controlnets" in ours:
        ours["controlnets"] = _paths(ours["controlnets"], root, "controlnets")
    return ModelOptions(**{**fields, **ours})


def version_from_inference_config(value: str | None, root: Path) -> str | None:
    """inference-v1.yaml -> "v1" etc.; read the file's UNet settings when it exists."""
    if not value:
        return None
    path = Path(_path(value, root, "inference_config"))
    if path.is_file():
        kwargs = (read_yaml(path) or {}).get("unet_additional_kwargs", {})
        if kwargs.get("motion_module_mid_block"):
            return "v2"
        return "v3" if kwargs.get("use_inflated_groupnorm") else "v1"
    for version in ("v1", "v2", "v3"):  # the official names, where the file is not at hand
        if version in path.stem:
            return version
    raise ConfigError(
        f"inference_config {value}: not found, and its name does not say v1, v2 or v3 "
        "(it decides how the motion module runs)"
    )


def run_from_settings(path: str | Path) -> Run:
    """The run a settings JSON (written beside an output), or a video holding its settings,
    describes: `--from` replays it."""
    path = Path(path)
    try:
        data = read_settings(path)
    except SettingsReadError as e:
        raise ConfigError(str(e)) from None
    if "prompt" not in data or "sampling" not in data:
        raise ConfigError(f"{path}: not a settings file written by animatediff generate")
    try:
        options = Options.from_json({g: data[g] for g in data if g in Options.__dataclass_fields__})
        models = data.get("models") or {}
        if not isinstance(models, dict):
            raise OptionError("models: expected a mapping of model options")
        models = ModelOptions(**_portable(models))
    except (OptionError, TypeError) as e:
        raise ConfigError(f"{path}: {e}") from None
    settings = {
        k: v for k, v in options.flat().items() if not isinstance(v, str) or not v.startswith("<")
    }
    recorded = data.get("sha256") if isinstance(data.get("sha256"), dict) else {}
    recorded = {_portable(k): v for k, v in recorded.items()}
    negative = data.get("negative_prompt", "")
    return Run(path.stem, models, data["prompt"], negative, settings, recorded)


_HUB_CACHE = re.compile(r".*/models--([^/]+)--([^/]+)/snapshots/([0-9a-f]+)(?:/(.+))?")


def _portable(value: Any) -> Any:
    """A recorded model path that does not exist here, as this install names the same file: a
    built-in file under this package's data, a Hub download as `org/repo@revision:file` (found
    in, or fetched into, this machine's cache). Lists and mappings element by element."""
    if isinstance(value, dict):
        return {k: _portable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_portable(v) for v in value]
    if not isinstance(value, str) or Path(value).exists():
        return value
    posix = value.replace("\\", "/")
    if "/animatediff/builtin/data/" in posix:
        return str(PACKAGE_DATA / posix.split("/animatediff/builtin/data/", 1)[1])
    hub = _HUB_CACHE.fullmatch(posix)
    if hub:
        org, repo, revision, file = hub.groups()
        return f"{org}/{repo}@{revision}" + (f":{file}" if file else "")
    return value


def _path(value: str | None, root: Path, key: str) -> str | None:
    """Official configs hold paths relative to the repository they run from (the cwd); fall
    back to the config's own folder."""
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        raise ConfigError(f"{key}: expected a path, got {value!r}")
    if Path(value).exists() or Path(value).is_absolute():
        return value
    beside = root / value
    return str(beside) if beside.exists() else value


def _paths(value, root: Path, key: str):
    """A path, or a list of paths (or of lists of them)."""
    if isinstance(value, list):
        return [_paths(v, root, key) for v in value]
    return _path(value, root, key)


def settings_json(info: dict, models: ModelOptions, extra: dict) -> str:
    """The settings file's text: the video's info plus models and provenance, strict JSON."""
    return json.dumps(
        {**info, "models": dataclasses.asdict(models), **extra}, indent=2, allow_nan=False
    )
