"""`animatediff generate`, its first half: the runs to make, built and checked (options,
model files, outputs) without importing torch, so a mistake costs under a second, not a
generation. `cli/render.py` then loads the models and renders (`execute`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import secrets
from pathlib import Path

from .. import builtin
from ..checkpoints import hub
from ..checkpoints.kinds import check_kind
from ..checkpoints.sd_folder import check_base_folder
from ..errors import UserError
from ..options import GROUPS, ModelOptions, OptionError, path_strength
from ..options import OUTPUT_SUFFIXES as SUPPORTED_SUFFIXES
from . import estimate
from .checks import OPTION_CLASSES, check_combinations, check_device, check_inputs, check_texts
from .config import ConfigError, Run, load_runs, read_yaml, run_from_settings
from .flags import UsageError, add_flags, as_usage_error, flag_of, given
from .outputs import Reservations, Slot, check_folders, extras_free, outputs_for, slots_free

log = logging.getLogger("animatediff")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("prompt", nargs="?", help="the prompt (omit with --config, --from)")
    p.add_argument("--negative-prompt", "-n", default="", help="what to avoid")
    p.add_argument("--prompt-map", metavar="FILE", help="JSON/YAML {frame: prompt} (prompt travel)")
    p.add_argument("--config", metavar="FILE", help="an official AnimateDiff prompt-config YAML")
    p.add_argument(
        "--from", dest="replay", metavar="FILE",
        help="remake a video: its settings JSON, or the video itself (settings are embedded)",
    )  # fmt: skip
    p.add_argument(
        "-o", "--output",
        help=f"output file ({', '.join(SUPPORTED_SUFFIXES)}, or a folder for PNGs); with "
        "--config, a folder (default: outputs/)",
    )  # fmt: skip
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    p.add_argument(
        "--skip-existing", action="store_true",
        help="skip runs whose output exists (or another run is making): resumes a --config batch",
    )  # fmt: skip
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
    given_sources = {
        "PROMPT": args.prompt is not None,
        "--prompt-map": args.prompt_map is not None,
        "--config": args.config is not None,
        "--from": args.replay is not None,
    }
    if args.overwrite and args.skip_existing:
        raise UsageError("give --overwrite or --skip-existing, not both")
    named = [name for name, present in given_sources.items() if present]
    if len(named) != 1:
        both = f" ({' and '.join(named)} given)" if named else ""
        raise UsageError(
            f"give one of: a PROMPT, --prompt-map FILE, --config FILE, --from FILE{both}"
        )
    overrides = {cls: given(args, cls) for cls in OPTION_CLASSES}
    settings = {k: v for cls in GROUPS.values() for k, v in overrides[cls].items()}
    models = overrides[ModelOptions]
    try:
        if args.config is not None:
            runs = load_runs(args.config)
        elif args.replay is not None:
            runs = [run_from_settings(args.replay)]
        else:
            runs = [Run("cli", ModelOptions(), _prompt(args), args.negative_prompt)]
        if args.config is not None or args.replay is not None:
            _say_overrides(args, {**settings, **models})
        runs = [_seeded(_override(run, models, settings)) for run in runs]
    except OptionError as e:
        raise as_usage_error(e, OPTION_CLASSES) from None
    except ConfigError as e:
        raise UsageError(str(e)) from None
    for run in runs:
        check_texts(run)
        check_inputs(run)
        check_combinations(run)
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
    if args.prompt_map is not None:
        data = read_yaml(Path(args.prompt_map))  # JSON is YAML too
        if not isinstance(data, dict) or not data:
            raise UsageError(
                f"--prompt-map {args.prompt_map}: expected a mapping {{frame: prompt}}"
            )
        for key, value in data.items():
            if not isinstance(value, str):
                raise UsageError(
                    f"--prompt-map {args.prompt_map}: the prompt of frame {key!r} is not text"
                )
        return data
    return args.prompt  # (an empty prompt: checks.check_texts, as for configs and maps)


def _builtin_names(run: Run) -> Run:
    """Built-in style, MotionLoRA and motion-module names (`animatediff models`) -> their files
    (a few-step motion module's image-layer LoRA becomes the adapter)."""
    m = run.models
    try:
        motion_module, adapter = builtin.named_motion_module(m.motion_module, m.adapter)
    except ValueError as e:
        raise UsageError(f"--motion-module {m.motion_module}: {e}; drop --adapter") from None
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
    models = dataclasses.replace(
        m,
        motion_module=motion_module,
        adapter=adapter,
        personal=personal,
        loras=loras,
        motion_loras=motion_loras,
    )
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
    if models.base is not None and models.motion_module is None:
        raise UsageError("--base needs --motion-module (the built-in one is for the built-in base)")
    return dataclasses.replace(models, **values)


def _resolve(spec: str, kind: str, flag: str, offline: bool | None, official: bool) -> str:
    try:
        if official and not Path(spec).exists() and Path(spec).name in hub.OFFICIAL_NAMES:
            return str(hub.resolve_official(spec, offline=offline))
        path = hub.resolve(spec, kind, offline=offline)
        if not (path.is_file() or path.is_dir()):  # a FIFO or device would block the run
            raise UsageError(f"{path}: not a regular file or folder")
        if kind == "base":
            check_base_folder(path)
        check_kind(path, kind)  # a file given to the wrong flag, from its header alone
        return str(path)
    except UserError as e:
        raise UsageError(f"{flag}: {e}") from None


@dataclasses.dataclass
class Job:
    """Checked runs, where their videos go, and which to make."""

    runs: list[Run]
    outputs: list[list[Slot]]  # per run, per video
    make: list[bool]  # False: skipped (--skip-existing)
    overwrite: bool
    config: Path | None = None  # a --config batch: its grid and a copy go beside the videos
    resume: bool = False  # --skip-existing: the batch's grid and config copy are refreshed
    reservations: Reservations = dataclasses.field(default_factory=Reservations)

    @property
    def folder(self) -> Path | None:
        return self.outputs[0][0].path.parent if self.config else None

    def close(self) -> None:
        """Free the output names this run reserved."""
        self.reservations.close()


def prepare(args: argparse.Namespace) -> Job:
    """Every check that needs no model (and no torch); models named by id are fetched."""
    runs = runs_from_args(args)
    for run in runs:
        check_device(run.models.device)
    slots = outputs_for(args, runs)
    check_folders(slots)
    config = Path(args.config) if args.config is not None else None
    job = Job(runs, slots, [], args.overwrite, config, args.skip_existing)
    try:
        job.make = slots_free(slots, args, job.reservations)
        if config:
            extras_free(job.folder, args)
        for run, make, run_slots in zip(runs, job.make, slots):
            if make:
                where = f"{config}: entry {run.name}" if config else ""
                estimate.check(run.options(), run.models.base, where)
            else:
                log.warning("skipped %s: it exists (--skip-existing)", run_slots[0].path)
        offline = True if args.offline else None  # None: HF_HUB_OFFLINE decides
        resolved: dict[ModelOptions, ModelOptions] = {}
        for i, r in enumerate(runs):
            if job.make[i] and r.models not in resolved:
                resolved[r.models] = resolve_models(r.models, offline, official=bool(config))
            runs[i] = dataclasses.replace(r, models=resolved.get(r.models, r.models))
    except BaseException:
        job.close()
        raise
    return job
