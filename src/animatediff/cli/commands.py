"""The heavy halves of `animatediff convert`, `inspect`, `models`, `train` and `evaluate`:
run once `cli/main.py` has parsed and checked their arguments."""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
from pathlib import Path

from .. import builtin
from ..builtin.model import builtin_model
from ..checkpoints.base import save_diffusers_folder
from ..checkpoints.detect import describe
from ..checkpoints.hub import KINDS, aliases
from ..checkpoints.motion import read_motion_checkpoint, save_motion_module
from ..options import ModelOptions
from ..training import train
from ..training.encode import encode_dataset
from ..world import evaluate
from .flags import UsageError, flag_of, printable
from .generate import KINDS as MODEL_KINDS
from .render import device

ORIGINAL_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth")


def convert(args: argparse.Namespace) -> None:
    layout = args.to or (
        "original" if Path(args.output).suffix in ORIGINAL_SUFFIXES else "diffusers"
    )
    kind = describe(args.input)["kind"]
    if kind == "motion module":
        ckpt = read_motion_checkpoint(args.input, args.motion_version)
        out = save_motion_module(ckpt, args.output, layout=layout, overwrite=args.overwrite)
    elif kind == "single-file SD checkpoint":
        if layout == "original":
            raise UsageError(
                f"{args.input} is a single-file checkpoint already; it converts to a diffusers "
                f"folder: give a folder name instead of {args.output}"
            )
        if not args.base:
            raise UsageError(
                "converting a single-file checkpoint needs --base (an SD1.5 folder or hub id) for configs"
            )
        out = save_diffusers_folder(args.input, args.base, args.output, overwrite=args.overwrite)
    else:
        raise UsageError(f"{args.input}: cannot convert a {kind}")
    print(printable(f"saved {out}"))


def inspect(args: argparse.Namespace) -> None:
    info = describe(args.file)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
        return
    width = max(len(k) for k in info)
    for key, value in info.items():
        if key == "parameters":
            value = f"{value:,} ({value / 1e6:.1f} M)"
        print(printable(f"{key:<{width}}  {value}"))


def models(args: argparse.Namespace) -> None:
    model = builtin_model()
    kind = "trained in the miniature world" if model.trained else "random weights (not trained)"
    print(f"base            {model.base}  ({kind})")
    print(f"motion module   {model.motion_module}")
    if builtin.adapter():
        print(f"domain adapter  {builtin.adapter()}  (applied with --adapter PATH[:SCALE])")
    rows = _builtin_rows(builtin.manifest())
    _print_rows(rows or [("no built-in styles, MotionLoRAs or few-step modules installed",)])
    print("\nHub names (downloaded once into the Hugging Face cache; --offline: the cache only):")
    _print_rows(
        [
            (f"{flag_of(field, (ModelOptions,))} {name}", KINDS[kind], spec)
            for field, kind in MODEL_KINDS.items()
            for name, spec in aliases(kind).items()
        ]
    )


def _builtin_rows(entries: dict) -> list[tuple[str, ...]]:
    """(flag, kind, file, about) of the built-in styles, MotionLoRAs and few-step modules."""
    rows = []
    for name, entry in entries["personal"].items():
        rows.append(
            (f"--personal {name}", entry["kind"], str(builtin.PACKAGE_DATA / entry["file"]))
        )
    for name, entry in entries["motion_loras"].items():
        about = (
            f"({entry['kind']}, rank {entry['rank']}, {entry['clips']} clips)"
            if "rank" in entry
            else ""
        )
        file = str(builtin.PACKAGE_DATA / entry["file"])
        rows.append((f"--motion-lora {name}[:STRENGTH]", "MotionLoRA", file, about))
    for name, entry in entries["motion_modules"].items():
        lora = "; with its image LoRA" if entry.get("adapter") else ""
        about = f"({entry['steps']}-step student: use --preset auto{lora})"
        file = str(builtin.PACKAGE_DATA / entry["file"])
        rows.append((f"--motion-module {name}", "few-step", file, about))
    return rows


def _print_rows(rows: list[tuple[str, ...]]) -> None:
    """Columns as wide as their longest cell (the last one unpadded)."""
    widths = [max(len(r[i]) for r in rows if i < len(r)) for i in range(max(map(len, rows)))]
    for row in rows:
        cells = [c.ljust(w) for c, w in zip(row[:-1], widths)] + [row[-1]]
        print("  ".join(cells).rstrip())


def train_command(args: argparse.Namespace) -> None:
    if os.environ.get("ANIMATEDIFF_TRACEBACK_AFTER"):  # diagnose a stuck run: stacks, then exit
        faulthandler.dump_traceback_later(
            float(os.environ["ANIMATEDIFF_TRACEBACK_AFTER"]), exit=True
        )
    if args.encode:
        if Path(args.encode).exists() and not Path(args.encode).is_dir():
            raise UsageError(f"--encode: {args.encode} is a file, not a folder")
        count = encode_dataset(args.training, args.encode, device=device("auto"))
        print(f"encoded {count} clips into {args.encode}")
        return
    for path in train(args.training, resume=args.resume, overwrite=args.overwrite):
        print(f"saved {path}")


def evaluate_command(args: argparse.Namespace) -> None:
    evaluate.run(args)
