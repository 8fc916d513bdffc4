"""The README's sample animations of the built-in models, made with the README's own commands.

    python -m animatediff.world.samples [FOLDER]    # default docs/builtin

Each is `animatediff generate PROMPT [extra flags] --seed 0 -o FOLDER/NAME.gif` (25 DDIM steps,
the CLI's defaults), run as a separate process exactly as a user would type it.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

SAMPLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "base": ("a red circle moving on a blue background", ()),
    "stripes": ("a yellow star on a green background", ("--personal", "stripes")),
    "outline": ("a blue square on a white background", ("--personal", "outline")),
    "outline-lora": ("a blue square on a white background", ("--personal", "outline-lora")),
    "zoom-in": (
        "zooming in on a red circle on a blue background",
        ("--motion-lora", "zoom-in"),
    ),
    "pan-left": (
        "panning left over a green star on a white background",
        ("--motion-lora", "pan-left"),
    ),
}


def command(name: str, folder: Path) -> list[str]:
    """The `animatediff generate` command line of sample ``name``."""
    prompt, extra = SAMPLES[name]
    out = folder / f"{name}.gif"
    return ["animatediff", "generate", prompt, *extra, "--seed", "0", "-o", str(out), "--overwrite"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder", type=Path, nargs="?", default=Path("docs/builtin"))
    args = p.parse_args(argv)
    args.folder.mkdir(parents=True, exist_ok=True)
    for name in SAMPLES:
        cmd = command(name, args.folder)
        print(" ".join(cmd), flush=True)
        run = [sys.executable, "-m", "animatediff.cli.main", *cmd[1:]]
        subprocess.run(run, check=True)


if __name__ == "__main__":
    main()
