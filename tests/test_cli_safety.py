"""The command line's promises on bad input (issue "Nothing lost, nothing silent"): every
mistake is one line and exit 2 before any model loads where it can be known then, nothing is
written or replaced by a failed run, no run replaces another's output, and code in a pickle
never runs. The concrete cases of the issue, one by one; `test_fuzz.py` explores around them.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
import yaml
from cli_helpers import (
    LIGHT_ONLY,
    accepted,
    assert_error,
    assert_ok,
    listing,
    run_cli,
    write_evil,
    write_evil_legacy,
)
from PIL import Image

from animatediff import builtin
from animatediff.builtin.model import builtin_model
from animatediff.checkpoints.io import CheckpointError
from animatediff.cli import main as cli_main
from animatediff.cli import outputs, render
from animatediff.cli import save as saving
from animatediff.cli.config import Run
from animatediff.cli.outputs import Slot
from animatediff.options import ModelOptions
from animatediff.video import Video, read_settings, save_video
from animatediff.video.files import claim, new_path, staged

REF = Path(__file__).parent / "data" / "official_tiny"
FAST = ("--frames", "2", "--steps", "1")


@pytest.fixture(autouse=True)
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    monkeypatch.chdir(folder)
    monkeypatch.setenv("ANIMATEDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return folder


def config(path: Path, **entry) -> Path:
    entry = {"motion_module": str(REF / "mm_v1.ckpt"), "prompt": ["a cat"], **entry}
    path.write_text(yaml.safe_dump([entry]))
    return path


def base_copy(tmp_path: Path, name: str = "base") -> Path:
    folder = tmp_path / name
    shutil.copytree(REF / "base", folder)
    return folder


# -- mistakes found before any model loads ---------------------------------------------------------
def _cases(tmp: Path) -> dict[str, tuple[list[str], tuple[str, ...]]]:
    """name -> (arguments after `generate`, what the message must name)."""
    pm = tmp / "maps"
    pm.mkdir()
    (pm / "bad.yaml").write_text("0: [unclosed\n")
    (pm / "nonstr.yaml").write_text("0: 5\n")
    (pm / "list.yaml").write_text("- a cat\n")
    (pm / "key.yaml").write_text("abc: a cat\n")
    (pm / "range.yaml").write_text("100000000000: a cat\n")
    (pm / "same.yaml").write_text("15: a cat\n-1: a dog\n")
    (pm / "empty.yaml").write_text('0: a cat\n4: ""\n')
    cfg = tmp / "configs"
    cfg.mkdir()
    (cfg / "folder.yaml").mkdir()
    (cfg / "scalar.yaml").write_text("5\n")
    broken = base_copy(tmp, "broken")
    (broken / "unet" / "config.json").write_text("{not json")
    heads0 = base_copy(tmp, "heads0")
    unet = json.loads((heads0 / "unet" / "config.json").read_text())
    (heads0 / "unet" / "config.json").write_text(json.dumps({**unet, "attention_head_dim": 0}))
    wide = base_copy(tmp, "wide")
    (wide / "unet" / "config.json").write_text(json.dumps({**unet, "block_out_channels": [10**6]}))
    (tmp / "empty").mkdir()
    (tmp / "plain.json").write_text("[1, 2]")
    (tmp / "nan.json").write_text('{"prompt": "a", "sampling": {"guidance_scale": NaN}}')
    (tmp / "a_file").write_text("x")
    existing = tmp / "taken.gif"
    existing.write_bytes(b"GIF89a someone else's")
    mm = str(REF / "mm_v1.ckpt")
    data = Path(builtin.__file__).parent / "data"  # safetensors files of every kind
    mm_st, personal = (
        str(data / "motion_module.safetensors"),
        str(data / "personal/stripes.safetensors"),
    )
    motion_lora = str(data / "motion_loras/zoom-in.safetensors")
    empty = tmp / "empty.ckpt"
    empty.write_bytes(b"")
    text_png, text_mp4 = tmp / "text.png", tmp / "text.mp4"
    text_png.write_text("not an image")
    text_mp4.write_text("not a video")
    png = tmp / "red.png"
    Image.new("RGB", (8, 8), (255, 0, 0)).save(png)
    return {
        "guidance inf": (["a cat", "--guidance-scale", "inf"], ("--guidance-scale", "finite")),
        "guidance nan": (["a cat", "--guidance-scale", "nan"], ("--guidance-scale", "finite")),
        "motion scale nan": (["a cat", "--motion-scale", "nan"], ("--motion-scale", "finite")),
        "adapter nan": (["a cat", "--adapter", f"{mm}:nan"], ("--adapter", "finite")),
        "lora inf": (["a cat", "--lora", f"{mm}:inf"], ("--lora", "finite")),
        "freeinit -1": (["a cat", "--freeinit", "-1"], ("--freeinit", "at least 0")),
        "fps 0": (["a cat", "--fps", "0"], ("--fps", "at least")),
        "fps nan": (["a cat", "--fps", "nan"], ("--fps", "finite")),
        "avi": (["a cat", "-o", "x.avi"], ("x.avi", ".avi")),
        "frames 1e9": (["a cat", "--frames", "1000000000"], ("--frames", "at most")),
        "width 800000": (["a cat", "--width", "800000"], ("--width", "at most")),
        "frames 5000": (["a cat", "--frames", "5000"], ("--frames", "at most")),
        "memory": (
            ["a cat", "--frames", "4096", "--width", "4096", "--height", "4096"],
            ("GiB of memory", "--frames"),
        ),
        "device bogus": (["a cat", "--device", "bogus"], ("--device", "bogus")),
        "scheduler": (["a cat", "--scheduler", "bogus"], ("--scheduler", "ddim")),
        "empty prompt": ([""], ("prompt is empty",)),
        "non-utf8 prompt": (["a \udcff cat"], ("UTF-8", "xff")),
        "prompt and map": (["a cat", "--prompt-map", str(pm / "key.yaml")], ("--prompt-map",)),
        "seed -1": (["a cat", "--seed", "-1"], ("--seed",)),
        "seed text": (["a cat", "--seed", "ten"], ("--seed", "integer")),
        "overlap": (["a cat", "--context-length", "4", "--context-overlap", "4"], ("overlap",)),
        "map yaml": (["--prompt-map", str(pm / "bad.yaml")], ("bad.yaml", "YAML")),
        "map not text": (["--prompt-map", str(pm / "nonstr.yaml")], ("nonstr.yaml", "text")),
        "map list": (["--prompt-map", str(pm / "list.yaml")], ("list.yaml", "mapping")),
        "map key": (["--prompt-map", str(pm / "key.yaml")], ("'abc'", "frame")),
        "map range": (["--prompt-map", str(pm / "range.yaml")], ("100000000000", "outside")),
        "map same frame": (["--prompt-map", str(pm / "same.yaml")], ("15", "-1")),
        "map missing": (["--prompt-map", str(pm / "none.yaml")], ("none.yaml", "not found")),
        "config folder": (["--config", str(cfg / "folder.yaml")], ("folder.yaml", "folder")),
        "config scalar": (["--config", str(cfg / "scalar.yaml")], ("scalar.yaml", "list")),
        "steps ten": (["--config", str(config(cfg / "a.yaml", steps="ten"))], ("a.yaml", "'ten'")),
        "L -4": (["--config", str(config(cfg / "b.yaml", L=-4))], ("b.yaml", "num_frames -4")),
        "steps 0": (["--config", str(config(cfg / "c.yaml", steps=0))], ("c.yaml", "steps 0")),
        "seed []": (["--config", str(config(cfg / "d.yaml", seed=[]))], ("d.yaml", "seed")),
        "seed str": (["--config", str(config(cfg / "e.yaml", seed="abc"))], ("e.yaml", "'abc'")),
        "lora configs": (
            ["--config", str(config(cfg / "f.yaml", motion_module_lora_configs=[{"alpha": 1}]))],
            ("f.yaml", "motion_module_lora_configs"),
        ),
        "lora configs int": (
            ["--config", str(config(cfg / "g.yaml", motion_module_lora_configs=5))],
            ("g.yaml", "motion_module_lora_configs"),
        ),
        "prompt int": (["--config", str(config(cfg / "h.yaml", prompt=[5]))], ("h.yaml", "5")),
        "n_prompt": (
            ["--config", str(config(cfg / "i.yaml", n_prompt=["a", "b", "c"]))],
            ("i.yaml", "n_prompt"),
        ),
        "W float": (["--config", str(config(cfg / "j.yaml", W=64.5))], ("j.yaml", "64.5")),
        "guidance .inf": (
            ["--config", str(config(cfg / "k.yaml", guidance_scale=float("inf")))],
            ("k.yaml", "finite"),
        ),
        "base is a file": (["a cat", "--base", mm, "--motion-module", mm], ("--base", "file")),
        "base empty": (["a cat", "--base", str(tmp / "empty")], ("--base", "unet/")),
        "base bad json": (["a cat", "--base", str(broken)], ("config.json", "JSON")),
        "base heads 0": (["a cat", "--base", str(heads0)], ("attention_head_dim", "0")),
        "base channels": (["a cat", "--base", str(wide)], ("block_out_channels", "1000000")),
        "exists": (["a cat", "-o", str(existing)], ("taken.gif", "--overwrite")),
        "parent is a file": (["a cat", "-o", str(tmp / "a_file" / "x.gif")], ("a_file", "file")),
        "from missing": (["--from", str(tmp / "nothing.json")], ("nothing.json", "not found")),
        "from not settings": (["--from", str(tmp / "plain.json")], ("plain.json",)),
        "from NaN": (["--from", str(tmp / "nan.json")], ("nan.json",)),
        "from a gif": (["--from", str(existing)], ("taken.gif",)),
        "init image": (["a cat", "--init-image", str(tmp / "no.png")], ("--init-image", "no.png")),
        "two sources": (["a cat", "--config", str(cfg / "a.yaml")], ("PROMPT", "--config")),
        "overwrite and skip": (["a cat", "--overwrite", "--skip-existing"], ("--skip-existing",)),
        "sparsectrl": (
            ["a cat", "--control-images", str(png)],
            ("--control-images", "--sparsectrl"),
        ),
        "controlnet": (["a cat", "--controlnet-images", str(png)], ("--controlnet-images",)),
        "ip-adapter": (["a cat", "--ip-adapter-images", str(png)], ("--ip-adapter",)),
        "freeinit init": (
            ["a cat", "--freeinit", "1", "--init-image", str(png)],
            ("--freeinit", "--init-image"),
        ),
        "control frames": (
            [
                "a cat",
                "--sparsectrl",
                mm,
                "--control-images",
                str(png),
                "--control-frames",
                "0",
                "3",
            ],
            ("1 --control-images", "2 --control-frames"),
        ),
        "image path type": (["--config", str(config(cfg / "l.yaml", init_image=5))], ("5",)),
        "alias of another kind": (["a cat", "--lora", "v2"], ("--lora", "alias of a motion")),
        "cuda graphs alone": (["a cat", "--cuda-graphs"], ("--cuda-graphs", "--compile full")),
        "base without module": (
            ["a cat", "--base", str(REF / "base")],
            ("--base", "--motion-module"),
        ),
        "empty keyframe": (["--prompt-map", str(pm / "empty.yaml")], ("frame 4", "empty")),
        "huge strength": (["a cat", "--lora", f"{personal}:1e30"], ("--lora", "within")),
        "encoder alone": (
            ["a cat", "--image-encoder", str(tmp)],
            ("--image-encoder", "--ip-adapter"),
        ),
        "empty file": (
            ["a cat", "--motion-module", empty],
            ("empty.ckpt", "not a valid checkpoint"),
        ),
        "motion module as a LoRA": (["a cat", "--lora", mm_st], ("--lora", "a motion module")),
        "text as an image": (
            ["a cat", "--init-image", text_png],
            ("--init-image", "not a readable image"),
        ),
        "text as a video": (
            ["a cat", "--init-video", text_mp4],
            ("--init-video", "not a readable video"),
        ),
        "LoRA as a motion module": (
            ["a cat", "--motion-module", motion_lora],
            ("--motion-module", "MotionLoRA, not a motion module"),
        ),
        "checkpoint as an IP-Adapter": (
            ["a cat", "--ip-adapter", personal],
            ("--ip-adapter", "single-file SD checkpoint, not an IP-Adapter"),
        ),
        "motion module as an embedding": (
            ["a cat", "--embedding", mm_st],
            ("--embedding", "motion module, not an embedding"),
        ),
        "sequential ip-adapter": (
            ["a cat", "--offload", "sequential", "--ip-adapter", mm],
            ("sequential", "IP-Adapter"),
        ),
    }


def test_every_mistake_is_one_line_before_loading(
    tmp_path: Path, work: Path, capsys, monkeypatch
) -> None:
    """Each case: exit 2, one line naming the flag, key or file, nothing written; and all of
    it before the heavy half (which would load models) is even imported."""
    cases = _cases(tmp_path)
    monkeypatch.setitem(cli_main.HEAVY, "generate", ("no.such.module", "never"))
    before = listing(tmp_path)
    for name, (args, needles) in cases.items():
        result = run_cli(capsys, "generate", *args)
        try:
            assert_error(result, *needles)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
    assert listing(tmp_path) == before
    assert not (tmp_path / "cache" / "locks").exists() or not any(
        (tmp_path / "cache" / "locks").iterdir()
    )


@pytest.mark.skipif(os.geteuid() == 0, reason="permission bits do not bind root")
def test_read_only_folder(tmp_path: Path, capsys) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert_error(run_cli(capsys, "generate", "a cat", "-o", folder / "x.gif"), "ro")
    finally:
        folder.chmod(0o755)


def test_light_half_imports_no_torch(tmp_path: Path) -> None:
    """The checks run before torch is imported: a mistake costs well under a second."""
    code = (
        "import sys, time\n"
        "t = time.perf_counter()\n"
        "from animatediff.cli.main import main\n"
        "for args in (['a', '--fps', 'nan'], ['a', '--frames', '0'], ['', '-o', 'x.avi'],\n"
        "             ['a', '--base', 'nowhere/x/y'], ['a', '--device', 'bogus']):\n"
        "    assert main(['generate', *args]) == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
        "print(time.perf_counter() - t)\n"
    )
    env = {**os.environ, "ANIMATEDIFF_CACHE": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr


# -- code in pickles never runs, for every flag that takes a file -----------------------------------
EVIL_FLAGS = (
    "--motion-module",
    "--personal",
    "--vae",
    "--lora",
    "--motion-lora",
    "--adapter",
    "--sparsectrl",
    "--controlnet",
    "--embedding",
    "--ip-adapter",
)


@pytest.mark.parametrize("flag", EVIL_FLAGS)
@pytest.mark.parametrize("writer", [write_evil, write_evil_legacy], ids=["zip", "legacy"])
def test_malicious_pickle_refused(flag: str, writer, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = writer(tmp_path / "evil.ckpt", marker)
    args = [flag, evil] if flag != "--motion-module" else []
    args += ["--image-encoder", tmp_path] if flag == "--ip-adapter" else []  # read after it
    motion = evil if flag == "--motion-module" else REF / "mm_v3.ckpt"
    out = tmp_path / "out.gif"
    result = run_cli(
        capsys, "generate", "a cat", "--base", REF / "base", "--motion-module", motion,
        *args, *FAST, "-o", out,
    )  # fmt: skip
    assert_error(result, "evil.ckpt", "refused for safety")
    assert not marker.exists()
    assert not out.exists() and not list(tmp_path.glob("*.json"))


def test_malicious_pickle_in_an_image_encoder_folder_refused(tmp_path: Path) -> None:
    """(`--image-encoder` needs `--ip-adapter`: the check the command runs on the folder.)"""
    marker, folder = tmp_path / "pwned", tmp_path / "image_encoder"
    write_evil(folder / "pytorch_model.bin", marker)
    (folder / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="refused for safety"):
        render.load(
            ModelOptions(ip_adapter=str(REF / "mm_v1.ckpt"), image_encoder=str(folder)), "cpu"
        )
    assert not marker.exists()


@pytest.mark.parametrize("flag", ["--base", "--controlnet"])
def test_malicious_pickle_in_a_folder_refused(flag: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    if flag == "--base":
        folder = base_copy(tmp_path)
        (folder / "unet" / "diffusion_pytorch_model.safetensors").unlink()
        write_evil(folder / "unet" / "diffusion_pytorch_model.bin", marker)
        args = ["--base", folder, "--motion-module", REF / "mm_v1.ckpt"]
    else:
        folder = tmp_path / "controlnet"
        write_evil(folder / "diffusion_pytorch_model.bin", marker)
        (folder / "config.json").write_text("{}")
        args = ["--base", REF / "base", "--motion-module", REF / "mm_v1.ckpt", flag, folder]
    result = run_cli(capsys, "generate", "a cat", *args, *FAST, "-o", tmp_path / "o.gif")
    assert_error(result, "diffusion_pytorch_model.bin", "refused for safety")
    assert not marker.exists() and not (tmp_path / "o.gif").exists()


@pytest.mark.parametrize("command", ["inspect", "convert"])
def test_malicious_pickle_other_commands(command: str, tmp_path: Path, capsys) -> None:
    marker = tmp_path / "pwned"
    evil = write_evil(tmp_path / "evil.ckpt", marker)
    args = [evil, tmp_path / "out.safetensors"] if command == "convert" else [evil]
    assert_error(run_cli(capsys, command, *args), "refused for safety")
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


# -- checks that need a model file read ---------------------------------------------------------------
def test_adapter_with_a_v2_module(tmp_path: Path, capsys) -> None:
    result = run_cli(
        capsys, "generate", "a cat", "--base", REF / "base", "--motion-module", REF / "mm_v2.ckpt",
        "--adapter", REF / "domain_adapter_v3.ckpt", *FAST, "-o", tmp_path / "o.gif",
    )  # fmt: skip
    assert_error(result, "--adapter", "v3", "mm_v2.ckpt is v2")
    assert not (tmp_path / "o.gif").exists()


def test_prompt_syntax_and_input_lengths_before_loading(tmp_path: Path, capsys, monkeypatch):
    """Checked once the heavy half is imported, before the first model loads."""

    def load(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(render, "load", load)
    short = save_video(torch.rand(3, 2, 8, 8), tmp_path / "short.gif")
    cases = {
        ("a (cat:1.2.3)",): ("attention weight", "1.2.3"),
        ("a cat", "--init-video", short, "--frames", "8"): ("short.gif", "2 frames"),
    }
    for args, needles in cases.items():
        result = run_cli(capsys, "generate", *args, "--steps", "1", "-o", tmp_path / "o.gif")
        assert_error(result, *needles)
        assert not (tmp_path / "o.gif").exists()


def test_adapter_with_a_v3_module_runs(tmp_path: Path, capsys) -> None:
    result = run_cli(
        capsys, "generate", "a cat", "--base", REF / "base", "--motion-module", REF / "mm_v3.ckpt",
        "--adapter", REF / "domain_adapter_v3.ckpt", *FAST, "--width", "64", "--height", "64",
        "-o", tmp_path / "o.gif",
    )  # fmt: skip
    assert_ok(result)
    assert read_settings(tmp_path / "o.gif")["models"]["adapter"][0].endswith("adapter_v3.ckpt")


def test_convert_single_file_to_a_file_name(tmp_path: Path, capsys) -> None:
    out = tmp_path / "o.safetensors"
    result = run_cli(
        capsys, "convert", REF / "personal_ldm.safetensors", out, "--base", REF / "base"
    )
    assert_error(result, "folder", "o.safetensors")
    assert not out.exists()


def test_convert_existing_output_names_the_flag(tmp_path: Path, capsys) -> None:
    out = tmp_path / "mm"
    out.mkdir()
    assert_error(run_cli(capsys, "convert", REF / "mm_v1.ckpt", out), "--overwrite")
    assert not any(out.iterdir())


# -- outputs: never replaced, never partial -------------------------------------------------------------
def _claimer(args: tuple[str, int, int]) -> str:
    """One process: write a file unique to it, claim `name` (or the next free one)."""
    folder, index, start = args
    slot = Slot(Path(folder) / "out.gif", renamable=True)
    while time.time() < start:  # start together
        pass
    with staged(slot.path) as tmp:
        tmp.write_text(f"written by {index}")
        for path in slot.candidates():
            try:
                claim(tmp, path, overwrite=False)
                return str(path)
            except FileExistsError:
                continue
    raise AssertionError("no name claimed")


def test_racing_processes_never_replace_each_other(work: Path) -> None:
    tmp_path = work
    start = time.time() + 1.0
    with multiprocessing.get_context("fork").Pool(8) as pool:
        claimed = pool.map(_claimer, [(str(tmp_path), i, start) for i in range(8)])
    assert len(set(claimed)) == 8
    contents = {Path(p).read_text() for p in claimed}
    assert contents == {f"written by {i}" for i in range(8)}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(Path(p).name for p in claimed)


def _video(seed: int) -> Video:
    frames = torch.rand(1, 3, 2, 16, 16, generator=torch.Generator().manual_seed(seed))
    info = {"prompt": "a cat", "sampling": {"seed": seed}, "seeds": [seed]}
    return Video(frames, fps=8, info=info)


def test_name_taken_meanwhile(tmp_path: Path) -> None:
    """A default name another run claimed while this one rendered: the next name is taken. A
    name the user gave: one line, and the other run's file is untouched."""
    run = Run("cli", ModelOptions(), "a cat")
    made_by = saving.provenance("cpu", {})
    other = tmp_path / "out.gif"
    other.write_bytes(b"the other run's video")
    (paths,) = [saving.save(_video(1), [Slot(other, True)], False, run, made_by)]
    assert paths == [tmp_path / "out-1.gif"]
    assert other.read_bytes() == b"the other run's video"
    assert read_settings(paths[0])["sampling"]["seed"] == 1
    assert read_settings(tmp_path / "out-1.gif.json")["outputs"] == [str(paths[0])]
    before = listing(tmp_path)
    with pytest.raises(saving.UsageError, match="out.gif appeared while rendering"):
        saving.save(_video(2), [Slot(other, False)], False, run, made_by)
    assert listing(tmp_path) == before


def test_names_reserved_while_a_run_makes_them(work: Path, capsys, monkeypatch) -> None:
    """A name another live run holds stops this one at once; a holder that died does not."""
    monkeypatch.setitem(cli_main.HEAVY, "generate", LIGHT_ONLY)
    target = work / "x.gif"
    lock = outputs._lock_file(target)
    lock.parent.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        lock.write_text(f"{holder.pid}\n")
        result = run_cli(capsys, "generate", "a cat", "-o", target)
        assert_error(result, "x.gif", "another animatediff run", str(holder.pid))
        assert lock.read_text() == f"{holder.pid}\n"
    finally:
        holder.kill()
        holder.wait()
    assert_ok(run_cli(capsys, "generate", "a cat", "-o", target))  # the stale lock is taken
    assert not lock.exists()  # and freed when the run ends
    accepted.clear()


def test_interrupted_write_leaves_nothing(work: Path) -> None:
    """SIGTERM arrives while a file is written: the temporary is removed, no target."""
    tmp_path = work
    target = tmp_path / "out.gif"
    with pytest.raises(cli_main.Terminated), cli_main._sigterm_raises():
        with new_path(target, overwrite=False) as tmp:
            tmp.write_bytes(b"half a")
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises long before this ends
    assert list(tmp_path.iterdir()) == []


def test_temporary_left_by_sigkill_is_removed_by_the_next_write(work: Path) -> None:
    code = (
        "import sys, time\n"
        "from animatediff.video.files import staged\n"
        "with staged(sys.argv[1]) as tmp:\n"
        "    tmp.write_text('half a video')\n"
        "    print('ready', flush=True)\n"
        "    time.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(work / "x.gif")], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "ready"
    proc.kill()  # SIGKILL: no time to clean up
    proc.wait()
    assert len(list(work.glob(".x.gif.*.tmp"))) == 1
    save_video(torch.rand(3, 2, 8, 8), work / "x.gif")
    assert sorted(p.name for p in work.iterdir()) == ["x.gif"]


def _process(cwd: Path, *args: object) -> subprocess.Popen:
    env = {**os.environ, "ANIMATEDIFF_TEST_THREADS": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "animatediff.cli.main", *map(str, args)],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_concurrent_runs_keep_every_result(tmp_path: Path) -> None:
    """Three runs, same seed, prompts that reduce to one name part: three videos. Two runs
    naming one -o: one video (the winner's, with its settings), one line for the other."""
    same = [_process(tmp_path, "generate", p, "--seed", 3, *FAST) for p in ("a cat!", "a cat?")]
    same.append(_process(tmp_path, "generate", "a cat.", "--seed", 3, *FAST))
    named = [_process(tmp_path, "generate", p, "--seed", 4, *FAST, "-o", "x.gif") for p in "ab"]
    results = [(*p.communicate(timeout=600), p.returncode) for p in same + named]
    results = [(code, out, err) for out, err, code in results]
    for code, _, err in results[:3]:
        assert code == 0 and "Traceback" not in err, err
    saved = [line.split(" ", 1)[1] for _, out, _ in results[:3] for line in out.splitlines()]
    videos = [s for s in saved if s.endswith(".gif")]
    assert len(set(videos)) == 3 and all((tmp_path / v).exists() for v in videos)
    codes = sorted(code for code, _, _ in results[3:])
    assert codes == [0, 2], results[3:]
    loser = next(err for code, _, err in results[3:] if code == 2)
    assert "x.gif" in loser and "Traceback" not in loser
    winner_prompt = read_settings(tmp_path / "x.gif")["prompt"]
    assert read_settings(tmp_path / "x.gif.json")["prompt"] == winner_prompt


@pytest.mark.slow
def test_sigterm_during_generation_leaves_nothing(work: Path, tmp_path: Path) -> None:
    """SIGTERM while sampling: exit 143, no file, no temporary, the reserved name freed."""
    args = ("generate", "a red circle", "--frames", 8, "--steps", 50, "-o", "x.gif")
    proc = _process(work, *args)
    deadline = time.time() + 300
    seen = ""
    while "denoising" not in seen and time.time() < deadline:
        seen += proc.stderr.read(1)
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=60)
    assert code == 128 + signal.SIGTERM
    assert "terminated" in proc.stderr.read()
    assert list(work.iterdir()) == []
    assert list((tmp_path / "cache" / "locks").iterdir()) == []


def test_existing_output_without_overwrite_is_kept(tmp_path: Path, capsys) -> None:
    out = tmp_path / "x.gif"
    out.write_bytes(b"mine")
    assert_error(run_cli(capsys, "generate", "a cat", *FAST, "-o", out), "--overwrite")
    assert out.read_bytes() == b"mine"
    assert_ok(run_cli(capsys, "generate", "a cat", *FAST, "-o", out, "--overwrite"))
    assert out.read_bytes()[:3] == b"GIF"


# -- mistakes known only once the models are loaded: still one line -------------------------------
def test_mistakes_known_after_loading_are_one_line(tmp_path: Path, capsys) -> None:
    """A clip skip beyond the text encoder's layers, two embeddings of one name, a motion
    module made for another UNet (the built-in one on the reference base): one line, exit 2,
    nothing written."""
    emb = {"emb_params": torch.zeros(1, 32)}
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        torch.save(emb, tmp_path / folder / "style.pt")
    nan_module = tmp_path / "nan.safetensors"
    source = builtin_model().motion_module
    tensors = safetensors.torch.load_file(source)
    tensors = {k: v.fill_(float("nan")) if "proj_out" in k else v for k, v in tensors.items()}
    with safetensors.safe_open(source, "pt") as f:
        safetensors.torch.save_file(tensors, nan_module, metadata=f.metadata())
    cases = {
        "clip skip": (["--clip-skip", "12"], ("clip_skip", "12")),
        "same name": (
            [
                "--embedding",
                tmp_path / "a" / "style.pt",
                "--embedding",
                tmp_path / "b" / "style.pt",
            ],
            ("style", "already loaded"),
        ),
        "other unet": (
            ["--base", REF / "base", "--motion-module", builtin_model().motion_module],
            ("does not fit",),
        ),
        "NaN weights": (["--motion-module", nan_module], ("not finite", "nothing was saved")),
    }
    for name, (args, needles) in cases.items():
        result = run_cli(capsys, "generate", "a cat", *FAST, "-o", tmp_path / "x.gif", *args)
        try:
            assert_error(result, *needles)
        except AssertionError as e:
            raise AssertionError(f"case {name!r}: {e}") from None
    assert not (tmp_path / "x.gif").exists()


def test_a_bug_is_a_short_report_pointing_at_debug(monkeypatch, capsys) -> None:
    """Anything but the project's own errors is a bug: a two-line report and exit 1; --debug
    adds the traceback and keeps the exit code (2 for a mistake)."""
    monkeypatch.setitem(cli_main.HEAVY, "generate", ("cli_helpers", "crash"))
    result = run_cli(capsys, "generate", "a cat")
    assert result.code == 1, result
    assert "unexpected error: RuntimeError: boom" in result.err, result
    assert "--debug" in result.err and "Traceback" not in result.err, result
    result = run_cli(capsys, "generate", "a cat", "--debug")
    assert result.code == 1 and "Traceback" in result.err and "boom" in result.err, result
    result = run_cli(capsys, "generate", "a cat", "--frames", "0", "--debug")  # a mistake
    assert result.code == 2, result


def test_convert_refuses_an_output_it_cannot_write(tmp_path: Path, capsys) -> None:
    """`convert ... out.avi` would have made a folder named out.avi: one line, nothing written."""
    result = run_cli(capsys, "convert", REF / "mm_v2.ckpt", tmp_path / "out.avi")
    assert_error(result, "out.avi", ".safetensors")
    assert not (tmp_path / "out.avi").exists()


def test_training_config_mistakes_before_torch(tmp_path: Path) -> None:
    """A training config's mistakes and a non-empty output_dir are said before torch loads."""
    (tmp_path / "bs0.yaml").write_text(
        "stage: motion\noutput_dir: out\ndata: {videos: v}\ntrain: {batch_size: 0}\n"
    )
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "full.yaml").write_text("stage: motion\noutput_dir: out\ndata: {videos: v}\n")
    code = (
        "import sys\n"
        "from animatediff.cli.main import main\n"
        "assert main(['train', 'bs0.yaml']) == 2\n"
        "assert main(['train', 'full.yaml']) == 2\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert "train.batch_size 0" in lines[0] and "not empty" in lines[1], lines
