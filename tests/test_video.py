"""Round-trip tests for animatediff.video: real files written to tmp_path and read back."""

from __future__ import annotations

import types
from pathlib import Path

import av
import pytest
import torch
from PIL import Image

from animatediff.video import Video, VideoReadError, read_video, save_video, video_info
from animatediff.video import write as video_write
from animatediff.video.read import read_frames_as_tensor

# Brightness coding: frame i is a flat grey of level OFFSET + STEP * i (well apart for H.264).
OFFSET, STEP = 10, 12


def gradient(frames: int = 8, height: int = 48, width: int = 64) -> torch.Tensor:
    """Smooth (3, f, h, w) test pattern that moves slowly over time."""
    y = torch.linspace(0, 1, height).view(1, height, 1).expand(frames, height, width)
    x = torch.linspace(0, 1, width).view(1, 1, width).expand(frames, height, width)
    t = torch.linspace(0, 0.3, frames).view(frames, 1, 1)
    return torch.stack([x, y, (0.5 * (x + y) + t).clamp(0, 1)])


def brightness_coded(frames: int, height: int = 32, width: int = 32) -> torch.Tensor:
    levels = (OFFSET + STEP * torch.arange(frames)).float() / 255
    return levels.view(1, frames, 1, 1).expand(3, frames, height, width).clone()


def decoded_indices(video: torch.Tensor) -> list[int]:
    means = video.mean(dim=(0, 2, 3)) * 255
    return [round((m - OFFSET) / STEP) for m in means.tolist()]


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def coded_mp4(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_video(brightness_coded(20), tmp_path_factory.mktemp("coded") / "coded.mp4")


# --- formats --------------------------------------------------------------------------------


def test_gif_frames_size_loop_and_duration(tmp_path: Path) -> None:
    path = save_video(gradient(6), tmp_path / "clip.gif", fps=10)
    with Image.open(path) as image:
        assert (image.n_frames, image.size) == (6, (64, 48))
        assert image.info["loop"] == 0  # loops forever
        durations = []
        for index in range(image.n_frames):
            image.seek(index)
            durations.append(image.info["duration"])
    assert durations == [100] * 6
    assert (read_video(path) - gradient(6)).abs().mean() < 0.05
    assert video_info(path).fps == pytest.approx(10)


def test_gif_loop_count(tmp_path: Path) -> None:
    path = save_video(gradient(2), tmp_path / "twice.gif", loop=2)
    with Image.open(path) as image:
        assert image.info["loop"] == 2


def test_mp4_is_h264_and_close_to_input(tmp_path: Path) -> None:
    frames = gradient(8)
    path = save_video(frames, tmp_path / "clip.mp4")
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
    info = video_info(path)
    assert (info.num_frames, info.width, info.height) == (8, 64, 48)
    assert info.fps == pytest.approx(8)
    decoded = read_video(path)
    assert decoded.shape == frames.shape
    assert (decoded - frames).abs().mean() < 0.05


def test_mp4_odd_size_is_padded_by_edge_replication(tmp_path: Path) -> None:
    frames = gradient(3, height=17, width=33)
    path = save_video(frames, tmp_path / "odd.mp4")
    info = video_info(path)
    assert (info.num_frames, info.width, info.height) == (3, 34, 18)
    decoded = read_video(path)
    assert (decoded[..., :17, :33] - frames).abs().mean() < 0.05
    # The extra column/row repeat the last real ones.
    assert (decoded[..., :, 33] - decoded[..., :, 32]).abs().mean() < 0.03
    assert (decoded[..., 17, :] - decoded[..., 16, :]).abs().mean() < 0.03


def test_webp_is_animated(tmp_path: Path) -> None:
    path = save_video(gradient(5), tmp_path / "clip.webp", fps=10)
    with Image.open(path) as image:
        assert (image.n_frames, image.size, image.is_animated) == (5, (64, 48), True)
        assert image.info["loop"] == 0
    assert read_video(path).shape == (3, 5, 48, 64)
    assert video_info(path).fps == pytest.approx(10)


def test_png_folder_round_trip_is_exact(tmp_path: Path) -> None:
    frames = torch.randint(0, 256, (3, 4, 16, 24), generator=torch.Generator().manual_seed(0))
    frames = frames.float() / 255
    folder = save_video(frames, tmp_path / "frames")
    assert leftovers(folder) == [f"frame_{i:05d}.png" for i in range(4)]
    assert torch.equal(read_video(folder), frames)
    assert video_info(folder).num_frames == 4


def test_existing_directory_gets_png_frames(tmp_path: Path) -> None:
    target = tmp_path / "out.mp4"
    target.mkdir()
    save_video(gradient(2), target, overwrite=True)
    assert leftovers(target) == ["frame_00000.png", "frame_00001.png"]


def test_unknown_suffix(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.avi.*\.gif, \.mp4, \.webp"):
        save_video(gradient(2), tmp_path / "clip.avi")


def test_values_are_clamped(tmp_path: Path) -> None:
    frames = gradient(2) * 3 - 1  # far outside [0, 1]
    decoded = read_video(save_video(frames, tmp_path / "clamped"))
    assert torch.equal(decoded, frames.clamp(0, 1).mul(255).round().div(255))


# --- overwrite and atomicity ----------------------------------------------------------------


def test_existing_file_needs_overwrite(tmp_path: Path) -> None:
    path = save_video(gradient(2), tmp_path / "clip.gif")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_video(gradient(3), path)
    save_video(gradient(3), path, overwrite=True)
    with Image.open(path) as image:
        assert image.n_frames == 3
    assert leftovers(tmp_path) == ["clip.gif"]


def test_png_folder_overwrite_replaces_whole_folder(tmp_path: Path) -> None:
    folder = save_video(gradient(5), tmp_path / "frames")
    (folder / "stray.txt").write_text("old")
    with pytest.raises(FileExistsError, match="--overwrite"):
        save_video(gradient(2), folder)
    save_video(gradient(2), folder, overwrite=True)
    assert leftovers(folder) == ["frame_00000.png", "frame_00001.png"]
    assert leftovers(tmp_path) == ["frames"]


class _FailingContainer:
    """Wraps a PyAV output container; muxes one packet, then raises as if encoding broke."""

    def __init__(self, inner: av.container.OutputContainer, path: str, seen: list[bool]) -> None:
        self._inner, self._path, self._seen = inner, path, seen

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)

    def __enter__(self) -> _FailingContainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self._inner.close()

    def mux(self, packets: list[av.Packet]) -> None:
        if not packets:  # x264 buffers frames before emitting packets
            return
        self._inner.mux(packets[:1])
        self._seen.append(Path(self._path).stat().st_size > 0)  # half-written temp file exists
        raise RuntimeError("simulated encoder failure")


def _failing_av(seen: list[bool]) -> types.SimpleNamespace:
    def open_(path: str, *args: object, **kwargs: object) -> _FailingContainer:
        return _FailingContainer(av.open(path, *args, **kwargs), path, seen)

    return types.SimpleNamespace(open=open_, VideoFrame=av.VideoFrame)


def test_failed_mp4_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[bool] = []
    monkeypatch.setattr(video_write, "av", _failing_av(seen))
    with pytest.raises(RuntimeError, match="simulated"):
        save_video(gradient(6), tmp_path / "sub" / "clip.mp4")
    assert seen == [True]
    assert leftovers(tmp_path / "sub") == []


def test_failed_overwrite_keeps_old_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = save_video(gradient(2), tmp_path / "clip.gif")
    before = path.read_bytes()

    def partial_save(self: Image.Image, fp: Path, *args: object, **kwargs: object) -> None:
        Path(fp).write_bytes(b"GIF89a truncated")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", partial_save)
    with pytest.raises(OSError, match="disk full"):
        save_video(gradient(4), path, overwrite=True)
    assert path.read_bytes() == before
    assert leftovers(tmp_path) == ["clip.gif"]


def test_failed_png_folder_write_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_save, calls = Image.Image.save, []

    def flaky_save(self: Image.Image, fp: Path, *args: object, **kwargs: object) -> None:
        calls.append(fp)
        if len(calls) == 3:
            raise OSError("disk full")
        real_save(self, fp, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "save", flaky_save)
    with pytest.raises(OSError, match="disk full"):
        save_video(gradient(5), tmp_path / "frames")
    assert leftovers(tmp_path) == []


# --- reading --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("start", "num_frames", "stride", "expected"),
    [
        (0, None, 1, list(range(20))),
        (3, 4, 2, [3, 5, 7, 9]),
        (5, None, 3, [5, 8, 11, 14, 17]),
        (19, 1, 5, [19]),
    ],
)
def test_read_video_selection(
    coded_mp4: Path, start: int, num_frames: int | None, stride: int, expected: list[int]
) -> None:
    video = read_video(coded_mp4, start=start, num_frames=num_frames, stride=stride)
    assert decoded_indices(video) == expected


def test_read_video_resize_and_center_crop(tmp_path: Path) -> None:
    frames = gradient(2, height=48, width=64)
    frames[:, :, :, :8] = 0  # dark left band: cropped away when fitting a square
    path = save_video(frames, tmp_path / "frames")
    video = read_video(path, size=(24, 24))
    assert video.shape == (3, 2, 24, 24)
    assert 0 <= video.min() and video.max() <= 1
    assert video[:, :, :, 0].mean() > 0.05


def test_too_short_video(coded_mp4: Path) -> None:
    with pytest.raises(VideoReadError, match=r"coded\.mp4.*6 frames.*only 20 frames"):
        read_video(coded_mp4, start=10, num_frames=6, stride=2)
    with pytest.raises(VideoReadError, match="only 20 frames"):
        read_video(coded_mp4, start=20)


def test_corrupt_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "x.mp4"
    path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    with pytest.raises(VideoReadError, match=r"x\.mp4"):
        read_video(path)
    with pytest.raises(VideoReadError, match=r"x\.mp4"):
        video_info(path)
    assert issubclass(VideoReadError, ValueError)


def test_image_folder_stops_reading_early(tmp_path: Path) -> None:
    folder = save_video(brightness_coded(4), tmp_path / "frames")
    (folder / "frame_00003.png").write_bytes(b"not a png")
    assert decoded_indices(read_video(folder, num_frames=3)) == [0, 1, 2]
    with pytest.raises(VideoReadError, match=r"frame_00003\.png"):
        read_video(folder)


def test_read_frames_as_tensor() -> None:
    images = [Image.new("RGB", (5, 4), (255, 0, 51)), Image.new("L", (5, 4), 0)]
    video = read_frames_as_tensor(images)
    assert video.shape == (3, 2, 4, 5)
    assert video[:, 0, 0, 0].tolist() == pytest.approx([1.0, 0.0, 0.2])
    assert video[:, 1].abs().sum() == 0


# --- Video ----------------------------------------------------------------------------------


def test_video_save_batch(tmp_path: Path) -> None:
    video = Video(torch.stack([gradient(3), gradient(3).flip(-1)]), fps=10)
    assert (video.batch_size, video.num_frames, video.height, video.width) == (2, 3, 48, 64)
    paths = video.save(tmp_path / "out.gif")
    assert paths == [tmp_path / "out-0.gif", tmp_path / "out-1.gif"]
    for path in paths:
        with Image.open(path) as image:
            assert (image.n_frames, image.info["duration"]) == (3, 100)
    folders = video.save(tmp_path / "out", fps=4)
    assert folders == [tmp_path / "out-0", tmp_path / "out-1"]
    assert all(len(leftovers(folder)) == 3 for folder in folders)
    with pytest.raises(FileExistsError):
        video.save(tmp_path / "out.gif")
    assert len(video.to_pil(1)) == 3 and video.to_pil(1)[0].size == (64, 48)


def test_video_save_single(tmp_path: Path) -> None:
    paths = Video(gradient(2)[None]).save(tmp_path / "one.webp")
    assert paths == [tmp_path / "one.webp"] and paths[0].is_file()
