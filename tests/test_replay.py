"""Replayable outputs: every video carries its settings (in the file and in a JSON beside it:
versions, device, dtype, SHA-256 of every model file, every option), `generate --from` remakes
the same frames from either, `--num-videos` records each video's own seed, a `--config` batch
gets the official `sample.gif` grid and `config.yaml`, and `--skip-existing` resumes a batch."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from cli_helpers import assert_error, assert_ok, run_cli

import animatediff
from animatediff.builtin.model import builtin_model
from animatediff.checkpoints import hashes
from animatediff.cli.config import _portable
from animatediff.options import Options
from animatediff.provenance import SettingsReadError
from animatediff.video import read_settings, read_video, save_video, video_grid

REF = Path(__file__).parent / "data" / "official_tiny"
FAST = ("--frames", "4", "--steps", "2")


@pytest.fixture(autouse=True)
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("ANIMATEDIFF_CACHE", str(tmp_path / "cache"))
    return folder


def frames(path: Path) -> torch.Tensor:
    return read_video(path)


# -- settings in the files --------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["clip.gif", "clip.webp", "clip.mp4", "frames"])
def test_settings_embedded_in_every_format(name: str, tmp_path: Path) -> None:
    text = json.dumps({"prompt": "a <red> & ünïcode circle", "sampling": {"seed": 3}})
    path = save_video(torch.rand(3, 3, 16, 16), tmp_path / name, metadata=text)
    assert read_settings(path) == json.loads(text)
    if name == "frames":  # every frame carries them, so any one alone says how it was made
        assert read_settings(path / "frame_00002.png") == json.loads(text)


def test_read_settings_refuses_files_without_them(tmp_path: Path) -> None:
    plain = save_video(torch.rand(3, 2, 8, 8), tmp_path / "plain.gif")
    with pytest.raises(SettingsReadError, match="plain.gif: holds no animatediff settings"):
        read_settings(plain)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(SettingsReadError, match="bad.json: settings are not valid JSON"):
        read_settings(tmp_path / "bad.json")
    with pytest.raises(SettingsReadError, match="not found"):
        read_settings(tmp_path / "none.gif")


# -- replay ---------------------------------------------------------------------------------------
def test_from_json_or_video_remakes_the_same_frames(work: Path, capsys) -> None:
    args = ("generate", "a red circle moving left", *FAST, "--seed", "7", "--guidance-scale", "5")
    assert_ok(run_cli(capsys, *args, "--prompt-tail", "on a blue background", "-o", "first"))
    settings = json.loads((work / "first.json").read_text())
    assert_ok(run_cli(capsys, "generate", "--from", work / "first.json", "-o", "again"))
    assert_ok(run_cli(capsys, "generate", "--from", work / "first", "-o", "again2"))
    first = frames(work / "first")
    assert torch.equal(frames(work / "again"), first)  # PNG frames: lossless, exact
    assert torch.equal(frames(work / "again2"), first)
    again = json.loads((work / "again.json").read_text())
    assert again["prompting"]["prompt_tail"] == "on a blue background"
    assert {k: v for k, v in again.items() if k != "outputs"} == {
        k: v for k, v in settings.items() if k != "outputs"
    }


def test_replay_on_another_install_finds_the_built_in_files(work: Path, capsys) -> None:
    """Recorded paths of built-in files from another install (another site-packages) are this
    install's files; a Hub cache path from another machine becomes its repo, revision and file."""
    args = ("generate", "a red circle", *FAST, "--seed", "2", "--personal", "stripes")
    assert_ok(run_cli(capsys, *args, "-o", "mine.gif"))
    data = json.loads((work / "mine.gif.json").read_text())
    elsewhere = "/elsewhere/lib/python3.11/site-packages/animatediff/builtin/data/"
    data["models"]["personal"] = elsewhere + "personal/stripes.safetensors"
    data["sha256"] = {elsewhere + "personal/stripes.safetensors": "0" * 64}
    (work / "moved.json").write_text(json.dumps(data))
    result = run_cli(capsys, "generate", "--from", work / "moved.json", "-o", "again.gif")
    assert_ok(result)
    assert torch.equal(frames(work / "again.gif"), frames(work / "mine.gif"))
    assert "stripes.safetensors changed since the video was made" in result.err  # hash compared
    cached = "/home/x/.cache/huggingface/hub/models--guoyww--animatediff/snapshots/ab12/mm.ckpt"
    assert _portable(cached) == "guoyww/animatediff@ab12:mm.ckpt"
    assert _portable("/nowhere/else.safetensors") == "/nowhere/else.safetensors"


def test_settings_file_says_everything(work: Path, capsys) -> None:
    assert_ok(run_cli(capsys, "generate", "a red circle", *FAST, "--seed", "3", "-o", "x.gif"))
    data = json.loads((work / "x.gif.json").read_text())
    assert data["animatediff_version"] == animatediff.__version__
    assert data["versions"]["torch"] == torch.__version__
    assert data["device"] == "cpu" and data["dtype"] == "float32"
    assert data["outputs"] == ["x.gif"]
    assert data["sampling"]["seed"] == 3 and data["seeds"] == [3]
    for group in ("sampling", "context", "noise", "prompting", "control", "init", "output"):
        assert group in data
    assert "prompt_head" in data["prompting"] and "controlnet_scale" in data["control"]
    model = builtin_model()
    digest = hashlib.sha256(model.motion_module.read_bytes()).hexdigest()
    assert data["sha256"][str(model.motion_module)] == digest
    assert str(model.base) in data["sha256"]
    embedded = read_settings(work / "x.gif")
    assert embedded["sampling"] == data["sampling"] and embedded["sha256"] == data["sha256"]


def test_num_videos_records_each_seed(work: Path, capsys) -> None:
    args = ("generate", "a green square", *FAST, "--seed", "11", "--num-videos", "2", "-o", "v")
    result = run_cli(capsys, *args)
    assert_ok(result)
    assert result.saved() == [Path("v-0"), Path("v-1")]
    for i in range(2):
        data = json.loads((work / f"v-{i}.json").read_text())
        assert data["sampling"]["seed"] == 11 + i and data["seeds"] == [11 + i]
        assert data["sampling"]["num_videos_per_prompt"] == 1
        assert data["batch"] == {"index": i, "videos": 2, "seed": 11}
    # the second video, remade alone from its settings: the same frames, up to rounding
    assert_ok(run_cli(capsys, "generate", "--from", work / "v-1.json", "-o", "alone"))
    # batched and single convolutions round differently: one 8-bit level at most
    assert (frames(work / "alone") - frames(work / "v-1")).abs().max() <= 1 / 255 + 1e-6


def test_default_names_are_unique_per_seed(work: Path, capsys) -> None:
    result = run_cli(capsys, "generate", "a cat!", *FAST, "--seed", "5", "--num-videos", "2")
    assert_ok(result)
    names = [p.name for p in result.saved()]
    assert len(names) == 2 and names[0].endswith("-a-cat-5.gif") and names[1].endswith("-6.gif")
    stamp = names[0].split("-a-cat")[0]
    assert len(stamp) == len("20250101-120000-123456")  # to the microsecond


# -- prompt-config batches ------------------------------------------------------------------------
def test_config_batch_grid_copy_and_resume(work: Path, capsys) -> None:
    config = work.parent / "batch.yaml"
    entry = {"motion_module": str(REF / "mm_v1.ckpt"), "prompt": ["a cat", "a dog"]}
    config.write_text(yaml.safe_dump([{**entry, "seed": [1, 2], "steps": 1, "L": 2, "W": 64}]))
    base = ("--base", REF / "base", "--height", "64")
    assert_ok(run_cli(capsys, "generate", "--config", config, *base, "-o", "out"))
    out = work / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "000-a-cat.gif", "000-a-cat.gif.json", "001-a-dog.gif", "001-a-dog.gif.json",
        "config.yaml", "sample.gif",
    ]  # fmt: skip
    assert (out / "config.yaml").read_text() == config.read_text()
    grid = frames(out / "sample.gif")
    cat, dog = frames(out / "000-a-cat.gif"), frames(out / "001-a-dog.gif")
    assert grid.shape == (3, 2, 64 + 4, 2 * 64 + 6)  # 2 pixels around and between
    # GIF keeps 256 colours per frame, so the grid's cells match their videos closely, not
    # exactly (the exact layout is test_video_grid_layout's)
    cells = grid[:, :, 2:66, 2:66], grid[:, :, 2:66, 68:132]
    for cell, own, other in ((cells[0], cat, dog), (cells[1], dog, cat)):
        close, apart = (cell - own).abs().mean(), (cell - other).abs().mean()
        assert close < 0.03 and close < apart / 2, (close, apart)

    assert_error(run_cli(capsys, "generate", "--config", config, *base, "-o", "out"), "000-a-cat")
    kept = (out / "000-a-cat.gif").stat().st_mtime_ns
    (out / "001-a-dog.gif").unlink()
    (out / "001-a-dog.gif.json").unlink()
    result = run_cli(capsys, "generate", "--config", config, *base, "-o", "out", "--skip-existing")
    assert_ok(result)
    assert result.saved() == [Path("out/001-a-dog.gif"), Path("out/sample.gif")]
    assert "skipped out/000-a-cat.gif: it exists" in result.err, result
    assert (out / "000-a-cat.gif").stat().st_mtime_ns == kept
    assert torch.equal(frames(out / "001-a-dog.gif"), dog)  # same seed, same video


def test_flags_with_config_say_they_override(work: Path, capsys, monkeypatch) -> None:
    from cli_helpers import LIGHT_ONLY, accepted

    from animatediff.cli import main as cli_main

    monkeypatch.setitem(cli_main.HEAVY, "generate", LIGHT_ONLY)
    config = work.parent / "c.yaml"
    config.write_text(yaml.safe_dump([{"motion_module": str(REF / "mm_v1.ckpt"), "prompt": "a"}]))
    result = run_cli(capsys, "generate", "--config", config, "--steps", "3", "--base", REF / "base")
    assert_ok(result)
    assert "animatediff: --steps from the command line overrides every entry's value" in result.err
    (job,) = accepted
    assert job.runs[0].options().sampling.num_inference_steps == 3
    accepted.clear()


# -- the built-in model's vocabulary ----------------------------------------------------------------
def test_unknown_words_are_said_long_prompts_are_not(work: Path, capsys) -> None:
    result = run_cli(capsys, "generate", "a zebra near a red circle", *FAST, "-o", "z.gif")
    assert_ok(result)
    warnings = [m for m in result.messages if "does not know" in m]
    assert len(warnings) == 1 and "'zebra'" in warnings[0] and "'near'" in warnings[0]
    long = " ".join(["a red circle moving left on a blue background"] * 12)  # > 77 tokens
    result = run_cli(capsys, "generate", long, *FAST, "-o", "long.gif")
    assert_ok(result)
    assert [m for m in result.messages if not m.startswith("denoising")] == [], result.err


# -- hashes and the grid ----------------------------------------------------------------------------
def test_hashes_are_cached_by_path_size_and_time(tmp_path: Path) -> None:
    file = tmp_path / "model.safetensors"
    file.write_bytes(b"weights one")
    expected = hashlib.sha256(b"weights one").hexdigest()
    assert hashes.sha256(file) == expected
    stat = file.stat()
    file.write_bytes(b"weights two")  # same size; put the time back: the cache answers
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert hashes.sha256(file) == expected
    os.utime(file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert hashes.sha256(file) == hashlib.sha256(b"weights two").hexdigest()
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.json").write_text("{}")
    first = hashes.sha256(folder)
    (folder / ".hidden").write_text("ignored")
    assert hashes.sha256(folder) == first
    (folder / "b.bin").write_text("more")
    assert hashes.sha256(folder) != first


def test_hub_blobs_are_named_by_their_hash(tmp_path: Path) -> None:
    digest = hashlib.sha256(b"x").hexdigest()
    blob = tmp_path / "models--o--n" / "blobs" / digest
    blob.parent.mkdir(parents=True)
    blob.write_bytes(b"x")
    link = tmp_path / "models--o--n" / "snapshots" / "abc" / "model.safetensors"
    link.parent.mkdir(parents=True)
    link.symlink_to(blob)
    assert hashes.sha256(link) == digest


def test_video_grid_layout() -> None:
    a = torch.rand(3, 2, 8, 8)
    b = torch.rand(3, 3, 8, 8)
    c = torch.rand(3, 2, 6, 8)
    grid = video_grid([a, b, c], columns=2)
    assert grid.shape == (3, 3, 2 * 10 + 2, 2 * 10 + 2)
    assert torch.equal(grid[:, :2, 2:10, 2:10], a)
    assert torch.equal(grid[:, 2, 2:10, 2:10], a[:, -1])  # held last frame
    assert torch.equal(grid[:, :, 2:10, 12:20], b)
    assert torch.equal(grid[:, :2, 12:18, 2:10], c)
    border = grid.clone()
    border[:, :, 2:10, 2:10] = border[:, :, 2:10, 12:20] = border[:, :, 12:18, 2:10] = 0
    assert border.abs().sum() == 0  # everything else black
    assert video_grid([a]) is a  # one video: as torchvision's make_grid, unpadded


def test_settings_json_keeps_a_scheduler_config() -> None:
    """A `scheduler_config` given from Python (as presets make) survives the settings JSON."""
    options = Options.build({"scheduler_config": {"timestep_spacing": "trailing"}})
    data = json.loads(json.dumps(options.to_json()))
    assert data["sampling"]["scheduler_config"] == {"timestep_spacing": "trailing"}
    assert Options.from_json(data) == options
