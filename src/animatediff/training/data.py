"""Training clips from a folder of videos, a WebVid-style CSV, or WebDataset tar shards.

Every random choice (clip start, flip) comes from a generator seeded by (seed, sample id), so a
sample is the same whichever process or worker reads it and whether or not the run was resumed.
A video that cannot be read, or is too short, is replaced by the next one and reported; a clip
without a caption (no .txt, or an empty one) trains as an unconditional sample and is counted.
Before training, `check_clips` reads the first clips' lengths so that a `num_frames` longer than
all of them fails at once instead of skipping every clip.
"""

from __future__ import annotations

import csv
import glob
import re
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch.utils.data import Dataset

from ..options import VIDEO_SUFFIXES
from ..video import read_video, video_info
from .config import ConfigError, DataConfig

# Still images are one-frame clips (for the image stages: base fine-tuning, adapter, styles).
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass(frozen=True)
class Clip:
    """Where a training video is: a file, or a member of a tar shard."""

    path: str
    caption: str
    member: str | None = None


def _expand_braces(pattern: str) -> list[str]:
    """`data/{000..009}.tar` -> the ten names (WebDataset's shard notation)."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}", pattern)
    if not m:
        return sorted(glob.glob(pattern)) or [pattern]
    lo, hi = m.group(1), m.group(2)
    names = [
        pattern[: m.start()] + str(i).zfill(len(lo)) + pattern[m.end() :]
        for i in range(int(lo), int(hi) + 1)
    ]
    return [n for p in names for n in _expand_braces(p)]


def folder_clips(folder: str | Path) -> list[Clip]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"data.videos: folder not found: {folder}")
    clips = []
    for path in sorted(folder.rglob("*")):
        if path.suffix.lower() in VIDEO_SUFFIXES + IMAGE_SUFFIXES:
            caption_file = path.with_suffix(".txt")
            caption = caption_file.read_text().strip() if caption_file.exists() else ""
            clips.append(Clip(str(path), caption))
    return clips


def csv_clips(csv_path: str | Path, video_folder: str | Path) -> list[Clip]:
    """WebVid layout: columns `videoid`, `name` (the caption), optional `page_dir`."""
    csv_path = Path(csv_path)
    if not csv_path.exists():
        raise ConfigError(f"data.csv: file not found: {csv_path}")
    if not Path(video_folder).is_dir():
        raise ConfigError(f"data.video_folder: folder not found: {video_folder}")
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"videoid", "name"} <= set(rows[0]):
        raise ConfigError(f"{csv_path}: needs columns videoid and name, has {list(rows[0])}")
    clips = []
    for row in rows:
        folder = Path(video_folder) / row.get("page_dir", "")
        clips.append(Clip(str(folder / f"{row['videoid']}.mp4"), row["name"]))
    return clips


def shard_clips(pattern: str) -> list[Clip]:
    """WebDataset tars: members `KEY.mp4` (or another video suffix) and `KEY.txt`."""
    clips = []
    for shard in _expand_braces(pattern):
        if not Path(shard).exists():
            raise ConfigError(f"data.shards: file not found: {shard}")
        with tarfile.open(shard) as tar:
            members = {m.name: m for m in tar.getmembers() if m.isfile()}
            for name in sorted(members):
                stem, suffix = name.rsplit(".", 1) if "." in name else (name, "")
                if f".{suffix.lower()}" in VIDEO_SUFFIXES:
                    text = members.get(f"{stem}.txt")
                    caption = tar.extractfile(text).read().decode().strip() if text else ""
                    clips.append(Clip(shard, caption, member=name))
    return clips


def find_clips(data: DataConfig) -> list[Clip]:
    if data.videos:
        clips = folder_clips(data.videos)
    elif data.csv:
        clips = csv_clips(data.csv, data.video_folder)
    else:
        clips = shard_clips(data.shards)
    if not clips:
        raise ConfigError("the dataset is empty: no videos found")
    return clips


PROBE = 16  # clips whose length `check_clips` reads


def _clip_length(clip: Clip) -> int:
    if clip.member is None:
        return video_info(clip.path).num_frames
    with (
        tarfile.open(clip.path) as tar,
        tempfile.NamedTemporaryFile(suffix=Path(clip.member).suffix) as tmp,
    ):
        tmp.write(tar.extractfile(clip.member).read())
        tmp.flush()
        return video_info(tmp.name).num_frames


def check_clips(clips: list[Clip], num_frames: int) -> None:
    """Fail when none of the first `PROBE` clips can be read, or all are shorter than
    `num_frames` (then every clip would be skipped)."""
    lengths, problems = [], []
    for clip in clips[:PROBE]:
        try:
            lengths.append(_clip_length(clip))
        except Exception as e:  # noqa: BLE001 - any unreadable file counts the same
            problems.append(f"{clip.path}{':' + clip.member if clip.member else ''}: {e}")
    if not lengths:
        raise ConfigError(
            f"data: none of the first {len(problems)} videos can be read; {problems[0]}"
        )
    if num_frames > max(lengths):
        raise ConfigError(
            f"data.num_frames {num_frames} is longer than the clips: the longest of the first "
            f"{len(lengths)} has {max(lengths)} frames"
        )


def sample_generator(seed: int, sample_id: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + sample_id)


class VideoClips(Dataset):
    """`dataset[sample_id]` -> {"pixels": (3, f, H, W) in [-1, 1], "caption", "skipped"}.

    `sample_id` may exceed `len(self)` (ids count across epochs); it picks video
    `sample_id % len(self)` and seeds that sample's random choices.
    """

    def __init__(self, clips: list[Clip], data: DataConfig, num_frames: int, seed: int):
        self.clips, self.data, self.num_frames, self.seed = clips, data, num_frames, seed

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, sample_id: int) -> dict:
        skipped = []
        for attempt in range(len(self.clips)):
            clip = self.clips[(sample_id + attempt) % len(self.clips)]
            try:
                pixels = self._read(clip, sample_generator(self.seed, sample_id))
            except Exception as e:  # one bad file must never end a run
                skipped.append(f"{clip.path}{':' + clip.member if clip.member else ''}: {e}")
                continue
            return {"pixels": pixels, "caption": clip.caption, "skipped": skipped}
        raise ConfigError(f"data: no video is readable and long enough; first: {skipped[0]}")

    def _read(self, clip: Clip, gen: torch.Generator) -> torch.Tensor:
        if clip.member is None:
            return self._read_file(clip.path, gen)
        with (
            tarfile.open(clip.path) as tar,
            tempfile.NamedTemporaryFile(suffix=Path(clip.member).suffix) as tmp,
        ):
            tmp.write(tar.extractfile(clip.member).read())
            tmp.flush()
            return self._read_file(tmp.name, gen)

    def _read_file(self, path: str, gen: torch.Generator) -> torch.Tensor:
        n = self.num_frames
        total = video_info(path).num_frames
        if total < n:
            raise ValueError(f"too short: {total} frames, need {n}")
        # As the official dataset: shorten the stride for short videos rather than skip them.
        stride = min(self.data.sample_stride, (total - 1) // (n - 1)) if n > 1 else 1
        span = (n - 1) * stride + 1
        start = int(torch.randint(0, total - span + 1, (1,), generator=gen))
        video = read_video(
            path, start=start, num_frames=n, stride=stride, size=self.data.sample_size
        )
        if self.data.hflip and torch.rand((), generator=gen) < 0.5:
            video = video.flip(-1)
        return video * 2 - 1


def collate(samples: list[dict]) -> dict:
    return {
        "pixels": torch.stack([s["pixels"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "skipped": [x for s in samples for x in s["skipped"]],
    }


class EncodedClips(Dataset):
    """Pre-encoded latents: each item holds the VAE posterior `mean` and `std` (4, f, h, w) and
    its caption; sampling from the posterior happens at training time, seeded per sample."""

    def __init__(self, folder: str | Path, seed: int):
        self.files = sorted(Path(folder).glob("*.safetensors"))
        if not self.files:
            raise ConfigError(f"data.cache: no encoded clips in {folder}")
        self.seed = seed
        self.captions = []
        for file in self.files:
            with safe_open(file, "pt") as f:
                self.captions.append(f.metadata().get("caption", ""))

    def num_frames(self) -> int:
        """The frame count of the encoded clips (of the first file)."""
        with safe_open(self.files[0], "pt") as f:
            return f.get_slice("mean").get_shape()[1]

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, sample_id: int) -> dict:
        index = sample_id % len(self.files)
        with safe_open(self.files[index], "pt") as f:
            item = {k: f.get_tensor(k) for k in ("mean", "std")}
        return {
            "latent_mean": item["mean"],
            "latent_std": item["std"],
            "caption": self.captions[index],
            "skipped": [],
        }


def collate_encoded(samples: list[dict]) -> dict:
    return {
        "latent_mean": torch.stack([s["latent_mean"] for s in samples]),
        "latent_std": torch.stack([s["latent_std"] for s in samples]),
        "captions": [s["caption"] for s in samples],
        "skipped": [],
    }
