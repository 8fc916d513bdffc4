"""`animatediff` command line: a thin layer over the library.

User mistakes (missing files, bad sizes, unknown names, bad syntax) print one line and exit 2;
`--debug` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

from .config import SAMPLING_KEYS, Run, load_runs

EXIT_USAGE = 2
DTYPES = ("fp32", "fp16", "bf16")


class UsageError(ValueError):
    pass


# -- argument parsing ----------------------------------------------------------------------------
def path_strength(text: str) -> tuple[str, float]:
    """`PATH[:STRENGTH]`; a colon followed by a path (e.g. `C:\\x`) belongs to the path."""
    path, sep, tail = text.rpartition(":")
    if not sep or "/" in tail or "\\" in tail or not path:
        return text, 1.0
    try:
        return path, float(tail)
    except ValueError:
        raise UsageError(
            f"bad strength {tail!r} in {text!r}: use PATH[:STRENGTH], e.g. style.safetensors:0.8"
        ) from None


def _add_generate(sub) -> None:
    p = sub.add_parser("generate", help="text to animation")
    p.add_argument("prompt", nargs="?", help="the prompt (omit with --config)")
    p.add_argument("--config", help="official AnimateDiff prompt-config YAML")
    p.add_argument("--base", help="diffusers SD1.5 folder or hub id (default: built-in model)")
    p.add_argument("--motion-module", help="motion module file or folder")
    p.add_argument("--motion-version", choices=("v1", "v2", "v3"), help="override detection")
    p.add_argument(
        "--personal",
        help="single-file personalised checkpoint, or a built-in style name (see `animatediff models`)",
    )
    p.add_argument("--vae", help="separate VAE file")
    p.add_argument("--lora", action="append", default=[], metavar="PATH[:STRENGTH]")
    p.add_argument("--lora-scaling", choices=("kohya", "official"), default="kohya")
    p.add_argument(
        "--motion-lora",
        action="append",
        default=[],
        metavar="PATH[:STRENGTH]",
        help="a MotionLoRA file or a built-in name (zoom-in, pan-left)",
    )
    p.add_argument("--adapter", metavar="PATH[:SCALE]", help="v3 domain adapter")
    p.add_argument("--negative-prompt", "-n", default="")
    p.add_argument("--frames", type=int, help="default: 16, or the --init-video's length")
    p.add_argument("--width", type=int)
    p.add_argument("--height", type=int)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance-scale", type=float, default=7.5)
    p.add_argument("--seed", type=int, help="default: random (printed and saved)")
    p.add_argument("--num-videos", type=int, default=1, help="videos per prompt")
    p.add_argument("--scheduler", default="ddim")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: fp16 on cuda, else fp32")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    p.add_argument("--fps", type=float, default=8)
    p.add_argument(
        "-o",
        "--output",
        help="output file (.gif/.mp4/.webp, or a folder for PNGs); with --config, a folder",
    )
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    g = p.add_argument_group("long videos and prompt travel")
    g.add_argument("--context-length", type=int, default=16, help="0: all frames at once")
    g.add_argument("--context-overlap", type=int, default=4)
    g.add_argument("--context-stride", type=int, default=1)
    g.add_argument(
        "--context-schedule", default="static", choices=("static", "uniform", "looped", "batched")
    )
    g.add_argument(
        "--context-fuse", default="pyramid", choices=("flat", "pyramid", "overlap-linear")
    )
    g.add_argument("--context-views", action="store_true", help="window only the motion modules")
    g.add_argument("--prompt-map", metavar="FILE", help="JSON/YAML {frame: prompt} (prompt travel)")
    g.add_argument("--prompt-head", default="", help="text before every prompt-map prompt")
    g.add_argument("--prompt-tail", default="", help="text after every prompt-map prompt")
    g.add_argument("--prompt-interpolation", default="linear", choices=("linear", "slerp"))
    g.add_argument("--freenoise", action="store_true", help="FreeNoise noise rescheduling")
    g.add_argument("--freeinit", type=int, default=0, metavar="N", help="FreeInit iterations")
    g.add_argument("--motion-scale", type=float, default=1.0)
    c = p.add_argument_group("control, img2vid and vid2vid")
    c.add_argument("--sparsectrl", metavar="PATH", help="SparseCtrl encoder (RGB or scribble)")
    c.add_argument(
        "--control-images",
        nargs="+",
        metavar="PATH",
        help="SparseCtrl keyframes (images or a video)",
    )
    c.add_argument("--control-frames", nargs="+", type=int, metavar="N", help="their frame indices")
    c.add_argument("--control-scale", type=float, default=1.0)
    c.add_argument("--controlnet", action="append", default=[], metavar="PATH[:SCALE]")
    c.add_argument(
        "--controlnet-images",
        action="append",
        default=[],
        metavar="PATH",
        help="a video or folder of frames, one per --controlnet",
    )
    c.add_argument("--controlnet-start", action="append", type=float, metavar="FRACTION")
    c.add_argument("--controlnet-end", action="append", type=float, metavar="FRACTION")
    c.add_argument("--init-image", metavar="PATH", help="img2vid: start from this image")
    c.add_argument("--init-video", metavar="PATH", help="vid2vid: start from this video")
    c.add_argument("--strength", type=float, default=0.8, help="how far the init is noised (0-1)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="animatediff", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_generate(sub)
    c = sub.add_parser("convert", help="convert a motion module or a single-file checkpoint")
    c.add_argument("input")
    c.add_argument(
        "output", help="file (.safetensors/.ckpt: original layout) or folder (diffusers)"
    )
    c.add_argument("--to", choices=("original", "diffusers"), help="default: from the output name")
    c.add_argument("--base", help="with a single-file checkpoint: the SD1.5 folder for configs")
    c.add_argument("--motion-version", choices=("v1", "v2", "v3"))
    c.add_argument("--overwrite", action="store_true")
    t = sub.add_parser("train", help="train a domain adapter, motion module or MotionLoRA")
    t.add_argument("config", help="training config YAML (see README)")
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument(
        "--encode",
        metavar="DIR",
        help="only pre-encode the dataset's latents into DIR (then train with data.cache: DIR)",
    )
    sub.add_parser("models", help="list the built-in models, styles and MotionLoRAs")
    from ..world.evaluate import add_arguments

    add_arguments(sub.add_parser("evaluate", help="measure the built-in models (paper's Table 1)"))
    i = sub.add_parser("inspect", help="what a checkpoint file is")
    i.add_argument("file")
    i.add_argument("--json", action="store_true")
    return parser


# -- generate ------------------------------------------------------------------------------------
def _device(name: str) -> str:
    import torch

    if name != "auto":
        return name
    if torch.cuda.is_available():
        return "cuda"
    return "mps" if torch.backends.mps.is_available() else "cpu"


def _dtype(name: str | None, device: str):
    import torch

    name = name or ("fp16" if device.startswith("cuda") else "fp32")
    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def _existing(path: str | None, flag: str) -> str | None:
    if path is not None and not Path(path).exists() and not _looks_like_hub_id(path, flag):
        raise UsageError(f"{flag}: file not found: {path}")
    return path


def _looks_like_hub_id(path: str, flag: str) -> bool:
    return flag == "--base" and re.fullmatch(r"[\w.-]+/[\w.-]+", path) is not None


def _check_sizes(args) -> None:
    for name in ("width", "height"):
        value = getattr(args, name)
        if value is not None and (value <= 0 or value % 8):
            raise UsageError(
                f"--{name} {value} is not a positive multiple of 8 (try {max(8, value // 8 * 8)})"
            )
    if (args.frames is not None and args.frames < 1) or args.steps < 1 or args.num_videos < 1:
        raise UsageError("--frames, --steps and --num-videos must be at least 1")
    from ..pipeline.schedulers import SCHEDULERS

    if args.scheduler not in SCHEDULERS:
        raise UsageError(
            f"unknown scheduler {args.scheduler!r}; choose one of: {', '.join(SCHEDULERS)}"
        )


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-")[:n].lower() or "video"


def _load(args, run):
    from ..pipeline import AnimationPipeline

    device = _device(args.device)
    for flag, paths in (
        ("--motion-module", [run.motion_module]),
        ("--personal", [run.personal]),
        ("--vae", [args.vae]),
        ("--lora", [p for p, _ in run.loras]),
        ("--motion-lora", [p for p, _ in run.motion_loras]),
        ("--adapter", [run.adapter[0]] if run.adapter else []),
        ("--sparsectrl", [run.sparsectrl]),
        ("--controlnet", [c["path"] for c in run.controlnets]),
    ):
        for path in paths:
            _existing(path, flag)
    return AnimationPipeline.load(
        base=_existing(args.base, "--base"),
        motion_module=run.motion_module,
        personal=run.personal,
        vae=args.vae,
        loras=run.loras,
        motion_loras=run.motion_loras,
        adapter=run.adapter,
        motion_version=run.motion_version or args.motion_version,
        lora_scaling=args.lora_scaling,
        sparsectrl=run.sparsectrl,
        controlnets=[c["path"] for c in run.controlnets] or None,
        scheduler=args.scheduler,
        dtype=_dtype(args.dtype, device),
        device=device,
    )


def _save(video, output: Path, args, sources: dict) -> list[Path]:
    paths = video.save(output, fps=args.fps, overwrite=args.overwrite)
    settings = {
        **video.info,
        "fps": args.fps,
        "models": sources,
        "outputs": [str(p) for p in paths],
    }
    meta = output.parent / f"{output.name}.json"
    tmp = meta.with_name(f".{meta.name}.tmp")
    tmp.write_text(json.dumps(settings, indent=2, default=str))
    os.replace(tmp, meta)  # atomic, like the video itself
    for p in paths:
        print(f"saved {p}")
    print(f"settings {meta}")
    return paths


def _default_output(prompt: str, seed, folder: Path = Path("outputs")) -> Path:
    return folder / f"{time.strftime('%Y%m%d-%H%M%S')}-{_slug(prompt)}-{seed}.gif"


# Flags spelled as the config keys; context_length and freeinit_iterations are mapped below.
SAMPLING_FLAGS = tuple(sorted(SAMPLING_KEYS - {"context_length", "freeinit_iterations"}))


def _sampling_from_args(args) -> dict:
    options = {name: getattr(args, name) for name in SAMPLING_FLAGS}
    options["context_length"] = args.context_length or None
    options["freeinit_iterations"] = args.freeinit
    return options


def _prompt_map(path: str) -> dict:
    import yaml

    _existing(path, "--prompt-map")
    data = yaml.safe_load(Path(path).read_text())  # JSON is YAML too
    if not isinstance(data, dict) or not data:
        raise UsageError(f"--prompt-map {path}: expected a mapping {{frame: prompt}}")
    return data


def _builtin_names(run: Run) -> Run:
    """Built-in style and MotionLoRA names (`animatediff models`) -> their files."""
    from .. import builtin

    names = builtin.manifest()
    if run.personal and not Path(run.personal).exists():
        if run.personal not in names["personal"]:
            known = ", ".join(names["personal"]) or "none installed"
            raise UsageError(
                f"--personal: no file and no built-in style {run.personal!r} ({known})"
            )
        kind, path = builtin.personal(run.personal)
        run.personal = str(path) if kind == "checkpoint" else None
        if kind == "lora":
            run.loras = [*run.loras, (str(path), 1.0)]
    run.motion_loras = [(builtin.motion_lora_file(p), s) for p, s in run.motion_loras]
    return run


def _run_from_args(args) -> Run:
    return _builtin_names(
        Run(
            name="cli",
            motion_module=args.motion_module,
            prompt=_prompt_map(args.prompt_map) if args.prompt_map else args.prompt,
            negative_prompt=args.negative_prompt,
            seed=args.seed if args.seed is not None else secrets.randbelow(2**31),
            personal=args.personal,
            loras=[path_strength(x) for x in args.lora],
            motion_loras=[path_strength(x) for x in args.motion_lora],
            adapter=path_strength(args.adapter) if args.adapter else None,
            steps=args.steps,
            guidance_scale=args.guidance_scale,
            width=args.width,
            height=args.height,
            num_frames=args.frames,
            num_videos=args.num_videos,
            sampling=_sampling_from_args(args),
            sparsectrl=args.sparsectrl,
            controlnets=_controlnets_from_args(args),
            inputs=_inputs_from_args(args),
        )
    )


def _inputs_from_args(args) -> dict:
    inputs = {}
    if args.control_images:
        for path in args.control_images:
            _existing(path, "--control-images")
        images = args.control_images
        inputs.update(
            control_images=images[0] if len(images) == 1 else images,
            control_frames=args.control_frames,
            control_scale=args.control_scale,
        )
    elif args.control_frames:
        raise UsageError("--control-frames needs --control-images")
    for flag, key in (("--init-image", "init_image"), ("--init-video", "init_video")):
        if getattr(args, key):
            inputs[key] = _existing(getattr(args, key), flag)
            inputs["strength"] = args.strength
    return inputs


def _controlnets_from_args(args) -> list[dict]:
    nets, images = args.controlnet, args.controlnet_images
    if len(images) != len(nets):
        raise UsageError(
            f"{len(nets)} --controlnet but {len(images)} --controlnet-images (one each)"
        )

    def each(values, default, flag):
        values = values or [default]
        if len(values) not in (1, len(nets)):
            raise UsageError(f"give {flag} once or once per --controlnet")
        return values * len(nets) if len(values) == 1 else values

    starts = each(args.controlnet_start, 0.0, "--controlnet-start")
    ends = each(args.controlnet_end, 1.0, "--controlnet-end")
    controlnets = []
    for net, frames, start, end in zip(nets, images, starts, ends):
        path, scale = path_strength(net)
        controlnets.append(
            dict(
                path=path,
                images=_existing(frames, "--controlnet-images"),
                scale=scale,
                start=start,
                end=end,
            )
        )
    return controlnets


def cmd_generate(args) -> None:
    _check_sizes(args)
    if args.config:
        runs = load_runs(args.config)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        folder = Path(args.output or Path("outputs") / f"{Path(args.config).stem}-{stamp}")
        outputs = [folder / f"{i:03d}-{_slug(str(run.prompt))}.gif" for i, run in enumerate(runs)]
    elif args.prompt or args.prompt_map:
        runs = [_run_from_args(args)]
        name = args.prompt or Path(args.prompt_map).stem
        output = Path(args.output) if args.output else _default_output(name, runs[0].seed)
        if output.is_dir():
            output = _default_output(name, runs[0].seed, output)
        outputs = [output]
    else:
        raise UsageError("give a PROMPT, --prompt-map FILE or --config FILE")
    for output in outputs:
        _check_free(output, args.overwrite)
    pipe, key = None, None
    for run, output in zip(runs, outputs):
        if run.model_key() != key:  # consecutive runs on the same models share the pipeline
            pipe, key = _load(args, run), run.model_key()
        video = pipe(
            run.prompt,
            negative_prompt=run.negative_prompt,
            num_frames=run.num_frames,
            height=run.height,
            width=run.width,
            num_inference_steps=run.steps,
            guidance_scale=run.guidance_scale,
            seed=None if run.seed == -1 else run.seed,
            num_videos_per_prompt=run.num_videos,
            fps=args.fps,
            **{**_sampling_from_args(args), **run.sampling},
            **run.call_kwargs(),
        )
        _save(video, output, args, pipe.sources)


def _check_free(output: Path, overwrite: bool) -> None:
    """Fail before generating, not after: the settings file sits beside every output."""
    settings = output.parent / f"{output.name}.json"
    if not overwrite and (output.exists() or settings.exists()):
        raise UsageError(f"{output} already exists; pass --overwrite to replace it")


# -- models / convert / inspect -------------------------------------------------------------------
def cmd_evaluate(args) -> None:
    from ..world.evaluate import run

    run(args)


def cmd_models(args) -> None:
    from .. import builtin

    model = builtin.builtin_model()
    kind = "trained in the miniature world" if model.trained else "random weights (not trained)"
    print(f"base            {model.base}  ({kind})")
    print(f"motion module   {model.motion_module}")
    if builtin.adapter():
        print(f"domain adapter  {builtin.adapter()}  (applied with --adapter PATH[:SCALE])")
    entries = builtin.manifest()
    for name, entry in entries["personal"].items():
        flag = f"--personal {name}"
        print(f"{flag:<36}{entry['kind']:<12}{builtin.PACKAGE_DATA / entry['file']}")
    for name, entry in entries["motion_loras"].items():
        flag = f"--motion-lora {name}[:STRENGTH]"
        about = (
            f"  ({entry['kind']}, rank {entry['rank']}, {entry['clips']} clips)"
            if "rank" in entry
            else ""
        )
        print(f"{flag:<36}{'MotionLoRA':<12}{builtin.PACKAGE_DATA / entry['file']}{about}")
    if not entries["personal"] and not entries["motion_loras"]:
        print("no built-in styles or MotionLoRAs installed")


def cmd_convert(args) -> None:
    from ..checkpoints.detect import describe

    _existing(args.input, "input")
    layout = args.to or (
        "original"
        if Path(args.output).suffix in (".safetensors", ".ckpt", ".pt", ".pth")
        else "diffusers"
    )
    kind = describe(args.input)["kind"]
    if kind == "motion module":
        from ..checkpoints.motion import read_motion_checkpoint, save_motion_module

        ckpt = read_motion_checkpoint(args.input, args.motion_version)
        out = save_motion_module(ckpt, args.output, layout=layout, overwrite=args.overwrite)
    elif kind == "single-file SD checkpoint":
        from ..checkpoints.base import save_diffusers_folder

        if not args.base:
            raise UsageError(
                "converting a single-file checkpoint needs --base (an SD1.5 folder or hub id) for configs"
            )
        out = save_diffusers_folder(args.input, args.base, args.output, overwrite=args.overwrite)
    else:
        raise UsageError(f"{args.input}: cannot convert a {kind}")
    print(f"saved {out}")


def cmd_inspect(args) -> None:
    from ..checkpoints.detect import describe

    _existing(args.file, "file")
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        print(f"{key:<{width}}  {value}")


def _quiet_libraries() -> None:
    """Keep the output to our own progress bar and results (set before they are imported)."""
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        os.environ.setdefault(name, "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def cmd_train(args) -> None:
    from ..training import load_config, train

    if os.environ.get("ANIMATEDIFF_TRACEBACK_AFTER"):  # diagnose a stuck run: stacks, then exit
        faulthandler.dump_traceback_later(
            float(os.environ["ANIMATEDIFF_TRACEBACK_AFTER"]), exit=True
        )
    if args.encode:
        from ..training.encode import encode_dataset

        count = encode_dataset(load_config(args.config), args.encode, device=_device("auto"))
        print(f"encoded {count} clips into {args.encode}")
        return
    for path in train(args.config, resume=args.resume):
        print(f"saved {path}")


COMMANDS = {
    "generate": cmd_generate,
    "convert": cmd_convert,
    "inspect": cmd_inspect,
    "models": cmd_models,
    "evaluate": cmd_evaluate,
    "train": cmd_train,
}


def main(argv: list[str] | None = None) -> int:
    _quiet_libraries()
    args = build_parser().parse_args(argv)
    from ..checkpoints.io import CheckpointError

    try:
        COMMANDS[args.command](args)
    except (UsageError, CheckpointError, FileNotFoundError, FileExistsError, ValueError) as e:
        if args.debug:
            raise
        print(f"animatediff: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except BrokenPipeError:  # output piped into `head` and the like
        return 0
    except KeyboardInterrupt:
        print("animatediff: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
