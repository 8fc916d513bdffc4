"""`animatediff generate`, its first half: the runs to make, built and checked (options,
model files, outputs) without importing torch, so a mistake costs under a second, not a
generation. `cli/render.py` then loads the models and renders (`execute`).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import logging
import os
import re
import secrets
import sys
from collections.abc import Mapping
from pathlib import Path

from .. import builtin
from ..checkpoints import hub
from ..checkpoints.sd_folder import check_base_folder
from ..errors import UserError
from ..options import GROUPS, ModelOptions, OptionError, path_strength
from ..options import OUTPUT_SUFFIXES as SUPPORTED_SUFFIXES
from . import estimate
from .config import PATH_OPTIONS, ConfigError, Run, load_runs, read_yaml, run_from_settings
from .flags import UsageError, add_flags, as_usage_error, flag_of, given
from .outputs import (
    CONFIG_COPY,
    GRID_NAME,
    Reservations,
    Slot,
    check_suffix,
    check_writable,
    indexed,
    slug,
    stamp,
    taken,
)

log = logging.getLogger("animatediff")
OPTION_CLASSES = (ModelOptions, *GROUPS.values())


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
    return [_builtin_names(run) for run in runs]


def check_inputs(run: Run) -> None:
    """Images and videos named by path (init, control, reference) must exist."""
    options = run.options().flat()
    for name in PATH_OPTIONS:
        values = options[name]
        flag = flag_of(name, OPTION_CLASSES)
        for value in values if isinstance(values, list | tuple) else [values]:
            if value is None:
                continue
            if not isinstance(value, str):  # from a config or settings file
                raise UsageError(f"{flag}: expected a file path, got {value!r}")
            if not Path(value).exists():
                raise UsageError(f"{flag} {value}: not found")


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
    if not args.prompt.strip():
        raise UsageError("the prompt is empty")
    return args.prompt


# -- prompts checked as the pipeline will read them ---------------------------------------------
_INDEX = re.compile(r"-?\d+")


def check_texts(run: Run) -> None:
    """Prompts must be valid text, and a prompt map's keys frames of the video."""
    options = run.options()
    p = options.prompting
    texts = [("the prompt", run.prompt), ("the negative prompt", run.negative_prompt)]
    texts += [("--prompt-head", p.prompt_head), ("--prompt-tail", p.prompt_tail)]
    for what, text in texts:
        for value in text.values() if isinstance(text, Mapping) else [text]:
            _check_utf8(what, value)
    frames = options.sampling.num_frames
    if frames is None and options.init.init_video is None:
        frames = estimate.DEFAULT_FRAMES
    for what, text in texts[:2]:
        if isinstance(text, Mapping):
            _check_keys(what, text, frames)


def _check_utf8(what: str, text: object) -> None:
    if not isinstance(text, str):
        raise UsageError(f"{what}: expected text, got {text!r}")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        byte = text[e.start].encode("utf-8", "surrogateescape")
        raise UsageError(
            f"{what} is not valid UTF-8 text (byte {byte!r} at character {e.start})"
        ) from None


def _check_keys(what: str, prompt_map: Mapping, frames: int | None) -> None:
    seen: dict[int, object] = {}
    for key in prompt_map:
        if isinstance(key, bool) or not (
            isinstance(key, int) or (isinstance(key, str) and _INDEX.fullmatch(key.strip()))
        ):
            raise UsageError(f"{what}: prompt-map key {key!r} is not a frame number")
        index = int(key)
        if frames is None:
            continue
        if index == -1:
            index = frames - 1
        if not 0 <= index < frames:
            raise UsageError(
                f"{what}: prompt-map key {key!r} is outside frames 0..{frames - 1} "
                "(-1: the last frame)"
            )
        if index in seen:
            raise UsageError(f"{what}: prompt-map keys {seen[index]!r} and {key!r} name one frame")
        seen[index] = key


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
        path = hub.resolve(spec, kind, offline=offline)
        if kind == "base":
            check_base_folder(path)
        return str(path)
    except UserError as e:
        raise UsageError(f"{flag}: {e}") from None


def outputs_for(args, runs: list[Run]) -> list[list[Slot]]:
    """Where each video of each run goes (one slot per video), suffixes checked."""
    when = stamp()
    if args.output == "":
        raise UsageError("-o: an empty path")
    if args.output:
        check_suffix(Path(args.output))
    if args.config is not None:
        folder = Path(args.output or Path("outputs") / f"{Path(args.config).stem}-{when}")
        names = [f"{i:03d}-{slug(_title(r.prompt))}" for i, r in enumerate(runs)]
        return [
            _slots(folder / f"{n}.gif", r, renamable=not args.output) for n, r in zip(names, runs)
        ]
    (run,) = runs
    name = args.prompt or (
        _title(run.prompt) if args.replay is not None else Path(args.prompt_map).stem
    )
    sampling = run.options().sampling
    seed, videos = sampling.seed, sampling.num_videos_per_prompt
    defaults = [f"{when}-{slug(name)}-{seed + i}.gif" for i in range(videos)]
    out = Path(args.output) if args.output else None
    if out is None or out.is_dir():
        folder = out or Path("outputs")
        return [[Slot(folder / d, renamable=True) for d in defaults]]
    return [_slots(out, run, renamable=False)]


def _slots(path: Path, run: Run, renamable: bool) -> list[Slot]:
    videos = run.options().sampling.num_videos_per_prompt
    paths = [path] if videos == 1 else [indexed(path, i) for i in range(videos)]
    return [Slot(p, renamable) for p in paths]


def _title(prompt: str | dict) -> str:
    return prompt if isinstance(prompt, str) else str(next(iter(prompt.values()), ""))


def slots_free(job_slots: list[list[Slot]], args, reservations: Reservations) -> list[bool]:
    """Which runs to make: names the user gave must be free (or --overwrite), and are
    reserved; with --skip-existing a run whose names exist or are reserved is skipped."""
    make = []
    for slots in job_slots:
        fixed = [s.path for s in slots if not s.renamable]
        busy = [p for p in fixed if taken(p) or reservations.holder(p) is not None]
        if busy and args.skip_existing:
            log.info("skipping %s: it exists or is being made", busy[0])
            make.append(False)
            continue
        if busy and not args.overwrite:
            pid = reservations.holder(busy[0])
            if pid is not None:
                raise UsageError(f"{busy[0]} is being made by another animatediff run (pid {pid})")
            raise UsageError(f"{busy[0]} already exists; pass --overwrite to replace it")
        for path in fixed:
            reservations.reserve(path)
        make.append(True)
    return make


def _check_folders(job_slots: list[list[Slot]]) -> None:
    for folder in sorted({s.path.parent for slots in job_slots for s in slots}):
        check_writable(folder)


def _extras_free(folder: Path, args) -> None:
    """A config batch's grid and config copy, in a folder the user named."""
    if not args.output or args.overwrite or args.skip_existing:
        return
    for name in (GRID_NAME, CONFIG_COPY):
        if (folder / name).exists():
            raise UsageError(f"{folder / name} already exists; pass --overwrite to replace it")


@dataclasses.dataclass
class Job:
    """Checked runs, where their videos go, and which to make."""

    runs: list[Run]
    outputs: list[list[Slot]]  # per run, per video
    make: list[bool]  # False: skipped (--skip-existing)
    overwrite: bool
    config: Path | None = None  # a --config batch: its grid and a copy go beside the videos
    reservations: Reservations = dataclasses.field(default_factory=Reservations)

    @property
    def folder(self) -> Path | None:
        return self.outputs[0][0].path.parent if self.config else None

    def close(self) -> None:
        """Free the output names this run reserved."""
        self.reservations.close()


# Present wherever a CUDA (or ROCm, which torch also calls cuda) device can be used on Linux.
GPU_DRIVER_FILES = ("/proc/driver/nvidia", "/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")


def check_device(name: str) -> None:
    """`--device cuda` where no GPU driver exists at all is said at once; whether torch can
    use the device is checked once it is imported (`render.device`)."""
    if not name.startswith("cuda"):
        return
    no_driver = sys.platform == "darwin" or (
        sys.platform == "linux" and not any(os.path.exists(f) for f in GPU_DRIVER_FILES)
    )
    if no_driver:
        raise UsageError(f"--device {name}: CUDA is not available on this machine (no GPU driver)")


def prepare(args: argparse.Namespace) -> Job:
    """Every check that needs no model (and no torch); models named by id are fetched."""
    runs = runs_from_args(args)
    for run in runs:
        check_device(run.models.device)
    slots = outputs_for(args, runs)
    _check_folders(slots)
    config = Path(args.config) if args.config is not None else None
    job = Job(runs, slots, [], args.overwrite, config)
    try:
        job.make = slots_free(slots, args, job.reservations)
        if config:
            _extras_free(job.folder, args)
        for run, make in zip(runs, job.make):
            if make:
                where = f"{config}: entry {run.name}" if config else ""
                estimate.check(run.options(), run.models.base, where)
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
