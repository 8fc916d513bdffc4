"""`animatediff generate`, its first half: the runs to make, built and checked (options,
model files, outputs) without importing torch, so a mistake costs under a second, not a
generation. `cli/render.py` then loads the models and renders (`execute`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import re
import secrets
import time
from pathlib import Path

from .. import builtin
from ..checkpoints import hub
from ..errors import UserError
from ..options import GROUPS, ModelOptions, OptionError, path_strength
from ..options import OUTPUT_SUFFIXES as SUPPORTED_SUFFIXES
from .config import ConfigError, Run, load_runs, read_yaml, run_from_settings
from .flags import UsageError, add_flags, as_usage_error, flag_of, given

log = logging.getLogger("animatediff")
OPTION_CLASSES = (ModelOptions, *GROUPS.values())


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (omit with --config, --from)")
    p.add_argument("--negative-prompt", "-n", default="", help="what to avoid")
    p.add_argument("--prompt-map", metavar="FILE", help="JSON/YAML {frame: prompt} (prompt travel)")
    p.add_argument("--config", metavar="FILE", help="an official AnimateDiff prompt-config YAML")
    p.add_argument("--from", dest="replay", metavar="JSON", help="replay a saved settings file")
    p.add_argument(
        "-o", "--output",
        help=f"output file ({', '.join(SUPPORTED_SUFFIXES)}, or a folder for PNGs); with "
        "--config, a folder (default: outputs/)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--offline", action="store_true",
        help="models named by Hub id or alias come from the local cache only (also HF_HUB_OFFLINE=1)",
    )  # fmt: skip
    add_flags(p, ModelOptions)
    for cls in GROUPS.values():
        add_flags(p, cls)


# -- building runs -------------------------------------------------------------------------------
def runs_from_args(args: argparse.Namespace) -> list[Run]:
    """The runs to make, with the command line's options applied, all checked."""
    sources = [x for x in (args.config, args.replay, args.prompt or args.prompt_map) if x]
    if len(sources) != 1:
        raise UsageError("give one of: a PROMPT (or --prompt-map FILE), --config FILE, --from JSON")
    overrides = {cls: given(args, cls) for cls in OPTION_CLASSES}
    settings = {k: v for cls in GROUPS.values() for k, v in overrides[cls].items()}
    models = overrides[ModelOptions]
    try:
        if args.config or args.replay:
            runs = load_runs(args.config) if args.config else [run_from_settings(args.replay)]
            _say_overrides(args, {**settings, **models})
        else:
            runs = [Run("cli", ModelOptions(), _prompt(args), args.negative_prompt)]
        runs = [_seeded(_override(run, models, settings)) for run in runs]
    except OptionError as e:
        raise as_usage_error(e, OPTION_CLASSES) from None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    return [_builtin_names(run) for run in runs]


def _override(run: Run, models: dict, settings: dict) -> Run:
    """The run with the command line's values; `--controlnet PATH:SCALE` also sets the scale."""
    merged = {**run.settings, **settings}
    if "controlnets" in models:
        pairs = [path_strength(c, "--controlnet") for c in models["controlnets"]]
        models = {**models, "controlnets": [p for p, _ in pairs]}
        merged.setdefault("controlnet_scale", [s for _, s in pairs])
    if "ip_adapter" in models:
        path, scale = path_strength(models["ip_adapter"], "--ip-adapter")
        models = {**models, "ip_adapter": path}
        merged.setdefault("ip_adapter_scale", scale)
    run = dataclasses.replace(
        run, models=dataclasses.replace(run.models, **models), settings=merged
    )
    run.options()  # every value checked now
    return run


def _seeded(run: Run) -> Run:
    """A run without a seed gets a random one now, so its file name and settings carry it."""
    if run.settings.get("seed") is not None:
        return run
    return dataclasses.replace(run, settings={**run.settings, "seed": secrets.randbelow(2**31)})


def _say_overrides(args, given_values: dict) -> None:
    for name in given_values:
        flag = flag_of(name, OPTION_CLASSES)
        log.warning("%s from the command line overrides every entry's value", flag)


def _prompt(args) -> str | dict:
    if args.prompt_map:
        data = read_yaml(Path(args.prompt_map))  # JSON is YAML too
        if not isinstance(data, dict) or not data:
            raise UsageError(
                f"--prompt-map {args.prompt_map}: expected a mapping {{frame: prompt}}"
            )
        if not all(isinstance(v, str) for v in data.values()):
            raise UsageError(f"--prompt-map {args.prompt_map}: every prompt must be text")
        return data
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    return args.prompt


def _builtin_names(run: Run) -> Run:
    """Built-in style and MotionLoRA names (`animatediff models`) -> their files."""
    m = run.models
    loras, personal = list(m.loras), m.personal
    if personal and not Path(personal).exists():
        styles = builtin.manifest()["personal"]
        if personal not in styles:
            known = ", ".join(styles) or "none installed"
            raise UsageError(f"--personal: no file and no built-in style {personal!r} ({known})")
        kind, path = builtin.personal(personal)
        personal = str(path) if kind == "checkpoint" else None
        loras += [(str(path), 1.0)] if kind == "lora" else []
    motion_loras = [(builtin.motion_lora_file(p), s) for p, s in m.motion_loras]
    models = dataclasses.replace(m, personal=personal, loras=loras, motion_loras=motion_loras)
    return dataclasses.replace(run, models=models)


# -- models by name -----------------------------------------------------------------------------
# ModelOptions field -> the hub module's kind of model
KINDS = {
    "base": "base",
    "motion_module": "motion_module",
    "personal": "personal",
    "vae": "vae",
    "loras": "lora",
    "motion_loras": "motion_lora",
    "adapter": "adapter",
    "sparsectrl": "sparsectrl",
    "controlnets": "controlnet",
    "embeddings": "embedding",
    "ip_adapter": "ip_adapter",
    "image_encoder": "image_encoder",
}


def resolve_models(models: ModelOptions, offline: bool | None, official: bool) -> ModelOptions:
    """Every model named, as a local path: files and folders as they are; aliases, Hub ids and
    `repo:file` downloaded once into huggingface_hub's cache (offline: taken from it). Files an
    official prompt config names are fetched from where the official script fetches them."""
    values = {}
    for name, kind in KINDS.items():
        flag = flag_of(name, (ModelOptions,))
        fetch = functools.partial(_resolve, flag=flag, offline=offline, official=official)
        value = getattr(models, name)
        if value is None or value == ():
            continue
        if name in ("loras", "motion_loras"):
            values[name] = tuple((fetch(p, kind), s) for p, s in value)
        elif name == "adapter":
            values[name] = (fetch(value[0], kind), value[1])
        elif name in ("controlnets", "embeddings"):
            values[name] = tuple(fetch(p, kind) for p in value)
        else:
            values[name] = fetch(value, kind)
    return dataclasses.replace(models, **values)


def _resolve(spec: str, kind: str, flag: str, offline: bool | None, official: bool) -> str:
    try:
        if official and not Path(spec).exists() and Path(spec).name in hub.OFFICIAL_NAMES:
            return str(hub.resolve_official(spec, offline=offline))
        return str(hub.resolve(spec, kind, offline=offline))
    except UserError as e:
        raise UsageError(f"{flag}: {e}") from None


def outputs_for(args, runs: list[Run]) -> list[Path]:
    """Where each run's video goes (checked: supported suffix, free unless --overwrite)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    if args.config:
        folder = Path(args.output or Path("outputs") / f"{Path(args.config).stem}-{stamp}")
        paths = [folder / f"{i:03d}-{slug(str(r.prompt))}.gif" for i, r in enumerate(runs)]
    else:
        name = args.prompt or Path(args.prompt_map or args.replay).stem
        seed = runs[0].settings.get("seed", "random")
        default = Path("outputs") / f"{stamp}-{slug(name)}-{seed}.gif"
        paths = [Path(args.output) if args.output else default]
        if paths[0].is_dir():
            paths = [paths[0] / default.name]
    for path in paths:
        if path.suffix and path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise UsageError(
                f"-o {path}: unsupported suffix {path.suffix!r}; use {', '.join(SUPPORTED_SUFFIXES)} "
                "or a folder name for PNG frames"
            )
        settings = path.parent / f"{path.name}.json"
        if not args.overwrite and (path.exists() or settings.exists()):
            raise UsageError(f"{path} already exists; pass --overwrite to replace it")
    return paths


def slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].lower() or "video"


@dataclasses.dataclass(frozen=True)
class Job:
    """Checked runs and where their videos go."""

    runs: list[Run]
    outputs: list[Path]
    overwrite: bool


def prepare(args: argparse.Namespace) -> Job:
    """Every check that needs no model (and no torch); models named by id are fetched."""
    runs = runs_from_args(args)
    outputs = outputs_for(args, runs)
    offline = True if args.offline else None  # None: HF_HUB_OFFLINE decides
    resolved: dict[ModelOptions, ModelOptions] = {}
    for i, r in enumerate(runs):
        if r.models not in resolved:
            resolved[r.models] = resolve_models(r.models, offline, official=bool(args.config))
        runs[i] = dataclasses.replace(r, models=resolved[r.models])
    return Job(runs, outputs, args.overwrite)
