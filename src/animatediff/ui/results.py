"""The server's results: one folder each, with generated names, under one output folder.

`<outputs>/<time>-<random>/` holds `animation.gif`, `animation.mp4`, `settings.json` (written
last: its presence marks a finished result), `command.txt`, `animation.yaml` and the stored
inputs. The gallery lists these folders, so it survives page reloads and server restarts.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from ..video import Video
from .settings import NotExpressible, Settings, command, config_yaml

NAME = re.compile(r"\d{8}-\d{6}-[0-9a-f]{6}")
GIF, MP4, SETTINGS, COMMAND, CONFIG = (
    "animation.gif",
    "animation.mp4",
    "settings.json",
    "command.txt",
    "animation.yaml",
)


@dataclass(frozen=True)
class Result:
    folder: Path
    settings: dict

    @property
    def name(self) -> str:
        return self.folder.name

    @property
    def gif(self) -> Path:
        return self.folder / GIF

    @property
    def mp4(self) -> Path:
        return self.folder / MP4

    @property
    def command(self) -> str:
        return (self.folder / COMMAND).read_text().strip()

    @property
    def config(self) -> Path | None:
        path = self.folder / CONFIG
        return path if path.exists() else None

    @property
    def summary(self) -> dict:
        """The main settings, in this module's own keys (the pipeline's `info` may change)."""
        return self.settings.get("summary", {})

    def caption(self) -> str:
        return f"{str(self.summary.get('prompt'))[:60]} (seed {self.summary.get('seed')})"


class Results:
    """Create, complete, list and look up result folders."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)

    def new_folder(self) -> Path:
        name = f"{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
        folder = self.root / name
        folder.mkdir()
        return folder

    def discard(self, folder: Path) -> None:
        """Remove an unfinished result's folder (a failed or cancelled generation)."""
        if folder.parent == self.root and not (folder / SETTINGS).exists():
            shutil.rmtree(folder, ignore_errors=True)

    def save(
        self,
        folder: Path,
        video: Video,
        settings: Settings,
        sources: dict,
        form: dict | None = None,
    ) -> Result:
        """Write the result's files; `form` (the page's values) lets the page reuse them."""
        video.save(folder / GIF)
        video.save(folder / MP4)
        _write(folder / COMMAND, command(settings) + "\n")
        try:
            _write(folder / CONFIG, config_yaml(settings, CONFIG))
            config_note = None
        except NotExpressible as e:
            config_note = str(e)
        info = {
            "summary": summary(settings),
            **video.info,
            "fps": settings.fps,
            "models": sources,
            "command": command(settings),
            "config": config_note or CONFIG,
            "form": form or {},
        }
        _write(folder / SETTINGS, json.dumps(info, indent=2, default=str))
        return Result(folder, info)

    def list(self, limit: int = 100) -> list[Result]:
        """Finished results, newest first."""
        names = sorted(
            (p.name for p in self.root.iterdir() if NAME.fullmatch(p.name)), reverse=True
        )
        results = (self.get(n) for n in names)
        return [r for r in results if r is not None][:limit]

    def get(self, name: str) -> Result | None:
        """A finished result by its folder name; None for any other name."""
        if not isinstance(name, str) or not NAME.fullmatch(name):
            return None
        folder = self.root / name
        try:
            settings = json.loads((folder / SETTINGS).read_text())
        except (OSError, ValueError):
            return None
        return Result(folder, settings) if (folder / GIF).exists() else None


def summary(s: Settings) -> dict:
    return dict(
        prompt=s.prompt or "(prompt travel)",
        seed=s.seed,
        num_frames=s.num_frames,
        width=s.width,
        height=s.height,
        steps=s.steps,
        scheduler=s.scheduler,
        guidance_scale=s.guidance_scale,
    )


def _write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
