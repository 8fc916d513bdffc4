"""End-to-end tests of `animatediff.training`, no mocks: every stage really trains the built-in
tiny SD1.5-architecture model (64x64 pixels, 16x16 latents) on real MP4 clips of coloured squares.

What is checked:
- each stage (adapter, motion, motion_lora, image_finetune) lowers a *fixed* evaluation loss
  (same batch, same noise, same timesteps before and after) and changes exactly the parameters it
  should: the frozen parts (VAE, text encoder, image UNet, the motion module under a MotionLoRA)
  stay bit-identical;
- what each stage writes loads back through `load_motion_module` / `AnimationPipeline.load`, a
  trained MotionLoRA changes the video, metrics.jsonl / loss.png / validation GIFs / TensorBoard;
- a run interrupted with SIGINT and resumed ends with the weights of an uninterrupted run;
- two data-parallel CPU processes with batch 1 reach the weights of one process with batch 2;
- the three data sources (folder, WebVid CSV, WebDataset shards), skipping of bad videos,
  determinism of samples; bad configs fail before training with one message; pre-encoding.

Training runs in-process through the Python API, but in a *forked child* (`in_child`): a native
crash (PyTorch kernels can segfault) then fails one test instead of killing the session, and
global state (Accelerate's singleton, torch flags, RNG) never leaks between tests. The CLI tests
run real subprocesses. The built-in model is built once per session in a temporary
ANIMATEDIFF_CACHE.
"""

from __future__ import annotations

import csv
import json
import os
import pickle
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

FRAMES = 4
SIZE = 64  # pixels; the built-in VAE downsamples 4x -> 16x16 latents (the UNet needs /8)
PROMPT = "a red square moving right"
BACKGROUND = (0.15, 0.15, 0.25)


def random_base() -> str:
    """The trainer is tested on the tiny random model (built in code), not on shipped weights."""
    from animatediff.builtin.model import random_model

    return str(random_model().base)


SUBPROCESS_TIMEOUT = 600  # seconds; generous, as other jobs may share the CPU

# name, colour (RGB in [0, 1]), direction (dx, dy), frames, caption
CLIPS = (
    ("red_right", (1.0, 0.1, 0.1), (1, 0), 10, "a red square moving right"),
    ("green_down", (0.1, 0.9, 0.1), (0, 1), 12, "a green square moving down"),
    ("blue_left", (0.1, 0.2, 1.0), (-1, 0), 8, "a blue square moving left"),
    ("yellow_up", (1.0, 0.9, 0.1), (0, -1), 11, "a yellow square moving up"),
)


# -- running code in a forked child -----------------------------------------------------------
class ChildCrashed(AssertionError):
    pass


def in_child(fn: Callable, *args, timeout: float = SUBPROCESS_TIMEOUT, **kwargs):
    """`fn(*args, **kwargs)` in a forked copy of this process; returns its (picklable) result or
    re-raises its exception. A child killed by a signal (e.g. SIGSEGV) raises `ChildCrashed`."""
    fd, result_path = tempfile.mkstemp(suffix=".pickle")
    os.close(fd)
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # the child: whatever happens, it ends here and never returns into pytest
        status = 1
        try:
            try:
                outcome = ("ok", fn(*args, **kwargs))
            except BaseException as e:  # noqa: BLE001 - everything goes back to the parent
                outcome = ("error", e, traceback.format_exc())
            with open(result_path, "wb") as f:
                try:
                    pickle.dump(outcome, f)
                except Exception:  # an unpicklable exception or result
                    f.seek(0)
                    f.truncate()
                    text = outcome[2] if outcome[0] == "error" else repr(outcome[1])
                    pickle.dump(("error", RuntimeError(text), text), f)
            status = 0
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(status)
    deadline = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if time.monotonic() > deadline:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                raise ChildCrashed(f"{fn.__name__} did not finish within {timeout} s")
            time.sleep(0.05)
        if os.WIFSIGNALED(status):
            sig = signal.Signals(os.WTERMSIG(status)).name
            raise ChildCrashed(f"{fn.__name__} crashed with {sig} (see the captured stderr)")
        with open(result_path, "rb") as f:
            outcome = pickle.load(f)
    finally:
        os.unlink(result_path)
    if outcome[0] == "ok":
        return outcome[1]
    error = outcome[1]
    if hasattr(error, "add_note"):
        error.add_note(f"in the forked child:\n{outcome[2]}")
    raise error


def run_cli_main(argv: list[str]) -> tuple[int, str, str]:
    """`animatediff.cli.main.main(argv)` in a forked child: (exit code, stdout, stderr)."""

    def run() -> tuple[int, str, str]:
        import diffusers.utils.logging
        import huggingface_hub.utils
        import transformers.utils.logging

        from animatediff.cli.main import main

        # What the CLI's environment settings do in a fresh process (here, too late for that).
        for library in (diffusers.utils.logging, transformers.utils.logging):
            library.disable_progress_bar()
            library.set_verbosity_error()
        huggingface_hub.utils.disable_progress_bars()
        streams = sys.stdout, sys.stderr
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            for stream in streams:
                stream.flush()
            # Python's streams (pytest replaced them) and the file descriptors (for anything
            # written below Python); this is the child, nothing else needs them.
            os.dup2(out.fileno(), 1)
            os.dup2(err.fileno(), 2)
            sys.stdout, sys.stderr = out, err
            try:
                code = main(argv)
            finally:
                sys.stdout, sys.stderr = streams
            out.flush()
            err.flush()
            out.seek(0)
            err.seek(0)
            return code, out.read(), err.read()

    return in_child(run)


# -- subprocesses -------------------------------------------------------------------------------
def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)  # ANIMATEDIFF_CACHE is set by the session fixture
    threads = str(torch.get_num_threads())  # the same kernels (and float sums) as in-process runs
    env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONUNBUFFERED="1")
    env.update(DIFFUSERS_VERBOSITY="error", TRANSFORMERS_VERBOSITY="error")
    env.update(extra)
    return env


def run_process(cmd: list[str], cwd: Path, timeout: float = SUBPROCESS_TIMEOUT, **env: str):
    return subprocess.run(
        cmd, cwd=cwd, env=subprocess_env(**env), capture_output=True, text=True, timeout=timeout
    )


def describe(proc) -> str:
    args = proc.args if isinstance(proc.args, str) else " ".join(map(str, proc.args))
    return f"{args}\n(exit {proc.returncode})\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


# -- the synthetic dataset ------------------------------------------------------------------------
def moving_square(colour, direction, frames: int, size: int = SIZE, side: int = 16) -> torch.Tensor:
    """(3, f, size, size) in [0, 1]: a square crossing a dark background."""
    video = torch.tensor(BACKGROUND).view(3, 1, 1, 1).repeat(1, frames, size, size)
    travel = size - side
    for f in range(frames):
        pos = [travel // 2, travel // 2]
        for axis, d in enumerate(direction):
            if d:
                along = round(travel * f / (frames - 1))
                pos[axis] = along if d > 0 else travel - along
        x, y = pos
        for c in range(3):
            video[c, f, y : y + side, x : x + side] = colour[c]
    return video


def write_clip(folder: Path, name: str, video: torch.Tensor, caption: str) -> Path:
    from animatediff.video import save_video

    folder.mkdir(parents=True, exist_ok=True)
    path = save_video(video, folder / f"{name}.mp4", fps=8, overwrite=True)
    (folder / f"{name}.txt").write_text(caption + "\n")
    return path


class Data:
    """The session's files: `root`, the clip folders and a saved random v3 motion module."""

    def __init__(self, root: Path):
        self.root = root
        self.clips = root / "clips"  # every clip + a corrupt one + a too-short one
        self.overfit = root / "overfit"  # two clips to overfit
        self.mixed = root / "mixed"  # one good clip, one corrupt, one too short
        self.empty = root / "empty"
        self.long = root / "long"  # one 48-frame clip (for num_frames above 32)
        self.captionless = root / "captionless"  # two clips: an empty caption, no caption file
        self.motion_module = root / "mm_random_v3.safetensors"


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Data:
    """Builds the built-in model once (in a temporary ANIMATEDIFF_CACHE) and writes the data."""
    root = tmp_path_factory.mktemp("training")
    patch = pytest.MonkeyPatch()
    patch.setenv("ANIMATEDIFF_CACHE", str(root / "cache"))
    for name in ("DIFFUSERS_VERBOSITY", "TRANSFORMERS_VERBOSITY"):
        patch.setenv(name, "error")
    # Imported once here so that forked children start warm.
    import accelerate  # noqa: F401
    import diffusers  # noqa: F401
    from diffusers import UNet2DConditionModel

    import animatediff.training.encode  # noqa: F401
    import animatediff.training.trainer  # noqa: F401
    from animatediff.builtin.model import random_model
    from animatediff.checkpoints.motion import save_motion_module
    from animatediff.motion import MotionModuleConfig, MotionModules

    random_model()
    d = Data(root)
    gen = torch.Generator().manual_seed(0)
    for name, colour, direction, frames, caption in CLIPS:
        write_clip(d.clips, name, moving_square(colour, direction, frames), caption)
    (d.clips / "corrupt.mp4").write_bytes(
        torch.randint(0, 256, (4096,), generator=gen, dtype=torch.uint8).numpy().tobytes()
    )
    (d.clips / "corrupt.txt").write_text("a corrupt file")
    write_clip(d.clips, "short", moving_square((1, 1, 1), (1, 1), 2), "a white square, too short")
    for name in ("red_right", "green_down"):
        for suffix in (".mp4", ".txt"):
            d.overfit.mkdir(exist_ok=True)
            shutil.copy(d.clips / f"{name}{suffix}", d.overfit)
    d.mixed.mkdir()
    for name in ("blue_left", "corrupt", "short"):
        for suffix in (".mp4", ".txt"):
            shutil.copy(d.clips / f"{name}{suffix}", d.mixed)
    d.empty.mkdir()
    (d.empty / "notes.txt").write_text("no videos here")
    write_clip(d.long, "long", moving_square((1, 0.1, 0.1), (1, 0), 48), CLIPS[0][4])
    for name in ("red_right", "green_down", "blue_left"):
        d.captionless.mkdir(exist_ok=True)
        shutil.copy(d.clips / f"{name}.mp4", d.captionless)
    (d.captionless / "red_right.txt").write_text(CLIPS[0][4])
    (d.captionless / "green_down.txt").write_text("  \n")  # empty; blue_left has no .txt

    torch.manual_seed(1)
    unet = UNet2DConditionModel.load_config(random_model().base / "unet")
    module = MotionModules(
        MotionModuleConfig.preset(
            "v3",
            block_out_channels=tuple(unet["block_out_channels"]),
            layers_per_block=unet["layers_per_block"],
        )
    )
    with torch.no_grad():  # zero-initialised outputs would make the module (and a LoRA) inert
        for _, m in module.named_temporal_modules():
            m.temporal_transformer.proj_out.weight.normal_(0, 0.05)
            m.temporal_transformer.proj_out.bias.normal_(0, 0.01)
    save_motion_module(module, d.motion_module)
    yield d
    patch.undo()


def merged(base: dict, change: dict) -> dict:
    """`base` with `change` applied; nested dicts are merged key by key."""
    out = dict(base)
    for key, value in change.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merged(out[key], value)
        else:
            out[key] = value
    return out


def config(
    stage: str,
    out: Path,
    videos: Path,
    *,
    steps: int = 2,
    batch_size: int = 1,
    lr: float = 1e-3,
    **extra,
) -> dict:
    """A tiny training config: the built-in model, 4 frames of 64x64, no trackers."""
    cfg = {
        "stage": stage,
        "base": random_base(),
        "output_dir": str(out),
        "data": {
            "videos": str(videos),
            "num_frames": FRAMES,
            "sample_size": SIZE,
            "sample_stride": 2,
            "num_workers": 0,
        },
        "train": {
            "steps": steps,
            "batch_size": batch_size,
            "learning_rate": lr,
            "seed": 0,
            "log_every": 1,
        },
        "checkpoint": {"every": 0},
        "report_to": [],
    }
    return merged(cfg, extra)


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line]


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def assert_same_tensors(a: dict, b: dict, what: str, atol: float = 0.0) -> float:
    """Same keys; every tensor equal (atol 0: bitwise). Returns the largest difference."""
    assert sorted(a) == sorted(b), f"{what}: different keys"
    worst, worst_key = 0.0, None
    for k in a:
        d = (a[k].double() - b[k].double()).abs().nan_to_num(nan=float("inf"))
        diff = d.max().item() if d.numel() else 0.0
        if diff > worst:
            worst, worst_key = diff, k
    assert worst <= atol, f"{what}: max abs difference {worst:.3g} (at {worst_key}) > {atol}"
    return worst


# -- 1. each stage learns what it should, and only that ------------------------------------------
STAGE_SETTINGS = {  # steps, learning rate: enough to overfit two clips (tuned on this model)
    "adapter": (16, 5e-2),
    "motion": (8, 1e-2),
    "motion_lora": (8, 3e-2),
    "image_finetune": (8, 1e-3),
}
EVAL_SEEDS = (11, 22, 33, 44)


def _frozen_parts(stage: str) -> tuple[str, ...]:
    parts = ("image.vae", "image.text_encoder")
    if stage != "image_finetune":
        parts += ("model.unet2d",)
    if stage == "motion_lora":
        parts += ("model.motion",)
    return parts


def _train_and_measure(cfg: dict) -> dict:
    """In the child: train `cfg` with a fixed evaluation loss before and after, and snapshots
    of every frozen and trainable tensor."""
    from animatediff.training import Trainer, parse_config
    from animatediff.training.data import collate
    from animatediff.training.loss import diffusion_loss

    trainer = Trainer(parse_config(cfg))
    model = trainer.accelerator.unwrap_model(trainer.model)
    batch = collate([trainer.dataset[i] for i in range(len(trainer.dataset))])
    n = len(batch["captions"])

    @torch.no_grad()
    def fixed_loss() -> float:
        losses = []
        for seed in EVAL_SEEDS:

            def gens(seed=seed):
                return [torch.Generator().manual_seed(seed * 1000 + j) for j in range(n)]

            latents, text = trainer._encode(batch, gens())
            loss = diffusion_loss(
                lambda x, t, text=text: trainer.model(x, t, text),
                latents,
                trainer.noise_scheduler,
                trainer.train.noise,
                gens(),
            )
            losses.append(float(loss))
        return sum(losses) / len(losses)

    owners = {"image": trainer.image, "model": model}

    def frozen_snapshot() -> dict[str, torch.Tensor]:
        snap = {}
        for part in _frozen_parts(cfg["stage"]):
            owner, attr = part.split(".")
            for k, v in getattr(owners[owner], attr).state_dict().items():
                snap[f"{part}.{k}"] = v.detach().clone()
        return snap

    def trainable_snapshot() -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    frozen_before, trainable_before = frozen_snapshot(), trainable_snapshot()
    loss_before = fixed_loss()
    results = trainer.fit()
    loss_after = fixed_loss()
    frozen_after, trainable_after = frozen_snapshot(), trainable_snapshot()
    frozen_grad = [
        n
        for n, p in model.named_parameters()
        if p.requires_grad
        and any(
            n.startswith(f"{x.split('.')[1]}.")
            for x in _frozen_parts(cfg["stage"])
            if x.startswith("model.")
        )
    ]
    return {
        "loss_before": loss_before,
        "loss_after": loss_after,
        "frozen_count": len(frozen_before),
        "frozen_changed": sorted(
            k for k in frozen_before if not torch.equal(frozen_before[k], frozen_after[k])
        ),
        "frozen_requiring_grad": frozen_grad,
        "trainable": sorted(trainable_before),
        "trainable_unchanged": sorted(
            k for k in trainable_before if torch.equal(trainable_before[k], trainable_after[k])
        ),
        "unet2d_parameters": sorted(f"unet2d.{k}" for k, _ in model.unet2d.named_parameters()),
        "motion_parameters": sorted(f"motion.{k}" for k, _ in model.motion.named_parameters())
        if model.motion is not None
        else [],
        "motion_state": {k: v.detach().clone() for k, v in model.motion.state_dict().items()}
        if model.motion is not None
        else None,
        "results": [str(p) for p in results],
    }


@pytest.fixture(scope="session")
def stage_run(data: Data, tmp_path_factory) -> Callable[[str], dict]:
    """`stage_run(stage)` -> the measurements of one short overfitting run (memoised)."""
    done: dict[str, dict] = {}

    def run(stage: str) -> dict:
        if stage not in done:
            steps, lr = STAGE_SETTINGS[stage]
            out = tmp_path_factory.mktemp(f"stage-{stage}")
            extra = {"motion_module": str(data.motion_module)} if stage == "motion_lora" else {}
            cfg = config(stage, out, data.overfit, steps=steps, batch_size=2, lr=lr, **extra)
            if stage in ("adapter", "motion_lora"):
                cfg["train"]["rank"] = 4
            try:
                done[stage] = {"out": out, **in_child(_train_and_measure, cfg)}
            except ChildCrashed as e:
                done[stage] = {"out": out, "crash": str(e)}
        if "crash" in done[stage]:
            pytest.fail(f"{stage} training crashed: {done[stage]['crash']}")
        return done[stage]

    return run


@pytest.mark.slow  # trains in a forked child
@pytest.mark.parametrize("stage", ["adapter", "motion", "motion_lora", "image_finetune"])
def test_stage_learns_and_only_trains_its_part(stage_run, stage: str):
    run = stage_run(stage)
    assert run["loss_after"] < 0.95 * run["loss_before"], (
        f"{stage}: fixed evaluation loss {run['loss_before']:.4f} -> {run['loss_after']:.4f}"
    )
    assert run["frozen_count"] > 0
    assert run["frozen_changed"] == [], (
        f"{stage}: frozen tensors changed: {run['frozen_changed'][:5]}"
    )
    assert run["frozen_requiring_grad"] == []
    trainable = [n.replace("/", ".") for n in run["trainable"]]  # LoRA ModuleDict keys use "/"
    assert trainable, f"{stage}: nothing trainable"
    if stage in ("adapter", "motion_lora"):
        assert all(
            n.startswith("lora.") and n.endswith((".down.weight", ".up.weight")) for n in trainable
        ), trainable[:5]
        wanted = ("attn1.", "attn2.") if stage == "adapter" else ("attention_blocks.",)
        assert all(any(w in n for w in wanted) for n in trainable), trainable[:5]
        # q, k, v and out of each attention layer: 4 LoRA layers x (down, up)
        assert len(trainable) % 8 == 0
    elif stage == "motion":
        assert trainable == run["motion_parameters"]
    else:
        assert trainable == run["unet2d_parameters"]
    assert run["trainable_unchanged"] == [], (
        f"{stage}: not updated: {run['trainable_unchanged'][:5]}"
    )


def test_seed_alone_determines_the_run(data: Data, tmp_path: Path):
    """`train.seed` fixes the new weights too (LoRA `down`, a new motion module): the same
    config gives the same result whatever the caller did with the global RNG before."""
    from animatediff.training import train

    def run(out: Path, global_seed: int) -> dict:
        torch.manual_seed(global_seed)  # e.g. the caller's own random work
        train(config("adapter", out, data.overfit, steps=1))
        return load_tensors(out / "domain_adapter.safetensors")

    a = in_child(run, tmp_path / "a", 1)
    b = in_child(run, tmp_path / "b", 2)
    assert_same_tensors(a, b, "same config and train.seed, different global RNG state")


def test_checkpoint_is_cheap(data: Data, tmp_path: Path):
    """A checkpoint of the motion stage (some 300 trainable tensors of a tiny model) costs well
    under a second: collecting the trainable tensors must not rescan the model once per key."""
    from animatediff.training import Trainer, parse_config

    def save() -> tuple[float, list[str]]:
        trainer = Trainer(parse_config(config("motion", tmp_path / "out", data.overfit)))
        trainer.out.mkdir(parents=True)
        start = time.process_time()
        path = trainer.save_checkpoint()
        return time.process_time() - start, sorted(p.name for p in path.iterdir())

    seconds, files = in_child(save)
    assert files == [
        "optimizer.bin",
        "progress.json",
        "random_states_0.pkl",
        "scheduler.bin",
        "trainable.safetensors",
    ]
    assert seconds < 3, f"saving a checkpoint took {seconds:.1f} s of CPU"


# -- 2. what each stage writes ---------------------------------------------------------------------
def _generate(pipe, seed: int = 0) -> torch.Tensor:
    video = pipe(
        PROMPT,
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        num_inference_steps=2,
        guidance_scale=7.5,
        seed=seed,
        progress=False,
    )
    return video.frames


@pytest.mark.slow  # trains in a forked child
def test_motion_stage_outputs_load(stage_run):
    from animatediff.checkpoints.motion import load_motion_module
    from animatediff.pipeline import AnimationPipeline

    run = stage_run("motion")
    out = run["out"]
    file, folder = out / "motion_module.safetensors", out / "motion_module_diffusers"
    assert sorted(run["results"]) == sorted([str(file), str(folder)])
    assert (folder / "config.json").is_file()
    trained = run["motion_state"]
    for path in (file, folder):
        loaded = load_motion_module(path).state_dict()
        assert_same_tensors(loaded, trained, f"{path.name} vs the trained module")
    frames = _generate(AnimationPipeline.load(base=random_base(), motion_module=file))
    assert frames.shape[-4:] == (3, FRAMES, SIZE, SIZE)
    assert torch.isfinite(frames).all()


@pytest.mark.slow  # trains in a forked child
def test_motion_lora_output_changes_the_video(data: Data, stage_run):
    from animatediff.pipeline import AnimationPipeline

    run = stage_run("motion_lora")
    lora = run["out"] / "motion_lora.safetensors"
    assert run["results"] == [str(lora)]
    keys = list(load_tensors(lora))
    assert keys and all(
        ".processor.to_" in k and k.endswith(("_lora.down.weight", "_lora.up.weight")) for k in keys
    ), keys[:4]
    assert any(k.endswith(".attention_blocks.0.processor.to_q_lora.down.weight") for k in keys)
    assert all(k.startswith(("down_blocks.", "up_blocks.", "mid_block.")) for k in keys)

    def video(**kwargs) -> torch.Tensor:
        return _generate(
            AnimationPipeline.load(base=random_base(), motion_module=data.motion_module, **kwargs)
        )

    plain = video()
    with_lora = video(motion_loras=[(lora, 1.0)])
    at_zero = video(motion_loras=[(lora, 0.0)])
    assert torch.equal(at_zero, plain), "a MotionLoRA at strength 0 must not change the video"
    assert (with_lora - plain).abs().max() > 1e-3, (
        "the trained MotionLoRA does not change the video"
    )


@pytest.mark.slow  # trains in a forked child
def test_adapter_output_loads(stage_run):
    from animatediff.pipeline import AnimationPipeline

    run = stage_run("adapter")
    adapter = run["out"] / "domain_adapter.safetensors"
    assert run["results"] == [str(adapter)]
    keys = list(load_tensors(adapter))
    assert keys and all(".processor.to_" in k for k in keys)
    assert all((".attn1.processor." in k or ".attn2.processor." in k) for k in keys)
    from animatediff.builtin.model import random_model

    model = random_model()
    plain = _generate(AnimationPipeline.load(model.base, model.motion_module))
    adapted = _generate(
        AnimationPipeline.load(model.base, model.motion_module, adapter=(adapter, 1.0))
    )
    assert adapted.shape == plain.shape
    assert (adapted - plain).abs().max() > 1e-3, "the trained adapter does not change the video"


@pytest.mark.slow  # trains in a forked child
def test_image_finetune_output_loads(stage_run):
    from diffusers import UNet2DConditionModel

    run = stage_run("image_finetune")
    unet = UNet2DConditionModel.from_pretrained(run["out"] / "unet")
    assert sum(p.numel() for p in unet.parameters()) > 0


@pytest.mark.slow  # trains in a forked child
@pytest.mark.parametrize("stage", ["adapter", "motion"])
def test_metrics_and_loss_plot(stage_run, stage: str):
    run = stage_run(stage)
    rows = read_metrics(run["out"])
    assert [r["step"] for r in rows] == list(range(1, STAGE_SETTINGS[stage][0] + 1))
    for r in rows:
        assert {"step", "loss", "lr", "samples_per_s", "skipped"} <= set(r), r
        assert r["loss"] > 0 and r["samples_per_s"] > 0 and r["skipped"] == 0
        assert r["lr"] == pytest.approx(STAGE_SETTINGS[stage][1])
    png = run["out"] / "loss.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    config_json = json.loads((run["out"] / "config.json").read_text())
    assert config_json["stage"] == stage


@pytest.mark.slow  # trains in a forked child
def test_validation_gifs_tensorboard_and_skipped(data: Data, tmp_path: Path):
    """A motion run on 1 good + 1 corrupt + 1 too-short clip, validating every step and
    logging to TensorBoard: GIFs appear, the bad clips are skipped and counted."""
    from animatediff.training import train

    out = tmp_path / "run"
    cfg = config(
        "motion",
        out,
        data.mixed,
        steps=2,
        report_to=["tensorboard"],
        validation={"prompts": [PROMPT], "every": 1, "num_frames": FRAMES, "steps": 2},
    )
    in_child(train, cfg)
    gifs = sorted((out / "validation").glob("*.gif"))
    assert [g.name for g in gifs] == ["step-00000001-0.gif", "step-00000002-0.gif"]
    from animatediff.video import video_info

    assert video_info(gifs[-1]).num_frames == FRAMES
    assert list(out.rglob("events.out.tfevents*")), "no TensorBoard events file"
    rows = read_metrics(out)
    # 2 steps x 1 sample drawn from a permutation of 3 clips: at least one is a bad clip.
    assert rows[-1]["skipped"] >= 1, rows


# -- 3. resume == uninterrupted ----------------------------------------------------------------------
@pytest.mark.slow  # two training processes
def test_sigint_then_resume_equals_uninterrupted(data: Data, tmp_path: Path):
    from animatediff.training import train

    steps = 6

    def cfg(out: Path, every: int) -> dict:
        return config(
            "motion",
            out,
            data.overfit,
            steps=steps,
            lr=1e-3,
            checkpoint={"every": every, "keep": 5},
        )

    whole = tmp_path / "whole"
    in_child(train, cfg(whole, every=0))  # the reference: never checkpointed, never stopped

    parts = tmp_path / "parts"
    cfg_file = write_yaml(tmp_path / "parts.yaml", cfg(parts, every=2))
    env = subprocess_env()
    first_checkpoint = parts / "checkpoints" / "step-00000002"
    with subprocess.Popen(
        [sys.executable, "-m", "animatediff.cli.main", "train", str(cfg_file)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        deadline = time.monotonic() + SUBPROCESS_TIMEOUT
        while not first_checkpoint.exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    assert proc.returncode == 130, f"exit {proc.returncode}\n{stdout}\n{stderr}"
    assert "interrupted" in stderr
    saved = sorted(p.name for p in (parts / "checkpoints").glob("step-*"))
    stopped_at = int(saved[-1].split("-")[1])
    assert 2 <= stopped_at < steps, saved
    assert not (parts / "motion_module.safetensors").exists()
    assert not list((parts / "checkpoints").glob(".tmp-*"))

    in_child(train, str(cfg_file), resume=True)
    a = load_tensors(whole / "motion_module.safetensors")
    b = load_tensors(parts / "motion_module.safetensors")
    assert_same_tensors(a, b, "resumed vs uninterrupted motion module")  # bitwise
    losses_a = {r["step"]: r["loss"] for r in read_metrics(whole)}
    losses_b = {r["step"]: r["loss"] for r in read_metrics(parts)}
    assert sorted(losses_b) == list(range(1, steps + 1))
    assert losses_b == losses_a


def _stopped_after_first_step(cfg: dict) -> int:
    """In the child: a run asked to stop (as by Ctrl-C) during its first step; returns the step
    of the checkpoint it wrote."""
    from animatediff.training import Trainer, parse_config

    trainer = Trainer(parse_config(cfg))
    trainer._stop_requested = True
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return int(trainer.latest_checkpoint().name.split("-")[1])
    raise AssertionError("the run did not stop")


def test_resume_continues_the_skipped_and_uncaptioned_counts(data: Data, tmp_path: Path):
    """A dataset with a corrupt, a too-short and two caption-less clips: the counts in
    metrics.jsonl (and every loss) after stop + resume are those of an uninterrupted run."""
    from animatediff.training import train

    folder = tmp_path / "clips"
    shutil.copytree(data.captionless, folder)
    for name in ("corrupt", "short"):
        for suffix in (".mp4", ".txt"):
            shutil.copy(data.clips / f"{name}{suffix}", folder)

    def cfg(out: Path) -> dict:
        return config("motion", out, folder, steps=4, batch_size=2, checkpoint={"every": 0})

    in_child(train, cfg(tmp_path / "whole"))
    assert in_child(_stopped_after_first_step, cfg(tmp_path / "parts")) == 1
    in_child(train, cfg(tmp_path / "parts"), resume=True)
    keys = ("step", "loss", "lr", "skipped", "uncaptioned")
    whole = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "whole")]
    parts = [{k: r[k] for k in keys} for r in read_metrics(tmp_path / "parts")]
    assert parts == whole
    assert whole[-1]["skipped"] >= 2 and whole[-1]["uncaptioned"] >= 2, whole[-1]


def test_checkpoints_are_accelerate_state_loadable_without_code(data: Data, tmp_path: Path):
    """A checkpoint is Accelerate's `save_state` folder: safetensors for every tensor the trainer
    adds, JSON for its progress, and Accelerate's own files, each of which loads with
    `torch.load(weights_only=True)` (NumPy's RNG state needs only NumPy's array types allowed,
    as Accelerate allows them). No registered-object pickle (those load with weights_only=False).
    Resuming restores the Python, NumPy and torch RNG states saved with it."""
    import random

    import numpy as np
    from accelerate.utils.other import TORCH_SAFE_GLOBALS

    from animatediff.training import Trainer, parse_config

    cfg = config("motion", tmp_path / "out", data.overfit, train={"ema_decay": 0.9})

    def save_then_resume() -> dict:
        trainer = Trainer(parse_config(cfg))
        trainer.out.mkdir()
        path = trainer.save_checkpoint()
        saved = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        torch.rand(5), np.random.rand(5), random.random()  # move every generator on
        Trainer(parse_config(cfg), resume=True)
        resumed = (torch.get_rng_state(), np.random.get_state()[1].copy(), random.getstate())
        return {"path": path, "saved": saved, "resumed": resumed}

    out = in_child(save_then_resume)
    assert torch.equal(out["saved"][0], out["resumed"][0]), "torch RNG not restored"
    assert (out["saved"][1] == out["resumed"][1]).all(), "NumPy RNG not restored"
    assert out["saved"][2] == out["resumed"][2], "Python RNG not restored"
    files = sorted(p.name for p in out["path"].iterdir())
    assert files == [
        "ema.safetensors",
        "optimizer.bin",
        "progress.json",
        "random_states_0.pkl",
        "scheduler.bin",
        "trainable.safetensors",
    ]
    for name in ("optimizer.bin", "scheduler.bin"):
        torch.load(out["path"] / name, weights_only=True)
    with pytest.raises(Exception):  # noqa: B017 - numpy arrays are not allowed by default
        torch.load(out["path"] / "random_states_0.pkl", weights_only=True)
    with torch.serialization.safe_globals(TORCH_SAFE_GLOBALS):
        state = torch.load(out["path"] / "random_states_0.pkl", weights_only=True)
    assert {"random_state", "numpy_random_seed", "torch_manual_seed"} <= set(state)
    progress = json.loads((out["path"] / "progress.json").read_text())
    assert progress["step"] == 0 and progress["ema"]["decay"] == 0.9


def _tree(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def test_output_dir_is_refused_unless_resumed_or_overwritten(data: Data, tmp_path: Path):
    """Through `animatediff train`: a second run into a finished output_dir is refused (exit 2,
    one line) and changes nothing; so is a failed --overwrite start; --overwrite replaces the
    run's outputs (old checkpoints and metrics gone) and keeps files that are not the trainer's."""
    out = tmp_path / "run"
    first = write_yaml(
        tmp_path / "first.yaml",
        config("motion", out, data.overfit, steps=2, checkpoint={"every": 1, "keep": 5}),
    )
    assert run_cli_main(["train", str(first)])[0] == 0
    (out / "notes.txt").write_text("not the trainer's")
    before = _tree(out)
    problems = []
    for name, argv in {
        "again": ["train", str(first)],
        "both flags": ["train", str(first), "--resume", "--overwrite"],
        "resume nothing": [
            "train",
            str(
                write_yaml(tmp_path / "other.yaml", config("motion", tmp_path / "x", data.overfit))
            ),
            "--resume",
        ],
        "bad overwrite": [
            "train",
            str(
                write_yaml(
                    tmp_path / "bad.yaml",
                    merged(yaml.safe_load(first.read_text()), {"data": {"num_frames": 40}}),
                )
            ),
            "--overwrite",
        ],
    }.items():
        code, _, stderr = run_cli_main(argv)
        lines = stderr.strip().splitlines()
        if code != 2 or len(lines) != 1 or not lines[0].startswith("animatediff: error:"):
            problems.append(f"{name}: exit {code}, stderr {stderr!r}")
        if _tree(out) != before:
            problems.append(f"{name}: the finished run was changed")
    assert not problems, "\n".join(problems)
    code, _, stderr = run_cli_main(["train", str(first)])
    assert all(w in stderr for w in ("output_dir", "--resume", "--overwrite")), stderr

    second = write_yaml(
        tmp_path / "second.yaml", config("motion", out, data.overfit, steps=3, lr=2e-3)
    )
    code, _, stderr = run_cli_main(["train", str(second), "--overwrite"])
    assert code == 0, stderr
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert not (out / "checkpoints").exists() and not (out / ".previous-run").exists()
    assert (out / "notes.txt").read_text() == "not the trainer's"
    assert json.loads((out / "config.json").read_text())["train"]["steps"] == 3
    assert load_tensors(out / "motion_module.safetensors").keys()


def test_a_failed_overwrite_puts_the_previous_run_back(data: Data, tmp_path: Path):
    """The new run fails at its first step (a crash injected where a CUDA out-of-memory would
    strike): the previous run's files are back, byte for byte, and nothing of the new one
    remains; a failed first run into a new folder leaves no folder."""
    from animatediff.training import Trainer, parse_config, train

    out = tmp_path / "run"
    in_child(train, config("motion", out, data.overfit, steps=2, checkpoint={"every": 1}))
    before = _tree(out)

    def crash(folder: Path, overwrite: bool) -> None:
        cfg = config(
            "motion", folder, data.overfit, steps=3, validation={"prompts": ["x"], "every": 1}
        )
        trainer = Trainer(parse_config(cfg), overwrite=overwrite)

        def out_of_memory(batch, micro):
            raise MemoryError("injected at the first step")

        trainer._micro_step = out_of_memory
        trainer.fit()

    with pytest.raises(MemoryError):
        in_child(crash, out, True)
    assert _tree(out) == before
    assert sorted(p.name for p in out.iterdir()) == sorted(
        p.name for p in out.iterdir() if p.name != ".previous-run"
    )
    with pytest.raises(MemoryError):
        in_child(crash, tmp_path / "new", False)
    assert not (tmp_path / "new").exists()


def test_a_killed_overwrite_keeps_the_run_before_it(tmp_path: Path):
    """The output folder's moves alone (`outputs.OutputSwap`): a run killed outright after
    setting the previous run aside leaves `.previous-run/`; the next --overwrite discards the
    killed run's partial outputs, keeps the earlier run aside and restores it if it fails too,
    and deletes it once it saves something of its own. Files that are not the trainer's stay."""
    from animatediff.errors import ConfigError
    from animatediff.training.outputs import OutputSwap, check_output_dir

    out = tmp_path / "run"
    out.mkdir()
    for name, text in (("metrics.jsonl", "old"), ("motion_module.safetensors", "old weights")):
        (out / name).write_text(text)
    (out / "notes.txt").write_text("mine")
    original = _tree(out)
    killed = OutputSwap(out, created=False)
    assert killed.replace_previous() == ["metrics.jsonl", "motion_module.safetensors"]
    (out / "metrics.jsonl").write_text("partial")  # ... and then SIGKILL: no roll-back
    with pytest.raises(ConfigError, match="previous-run"):
        check_output_dir(out, resume=False, overwrite=False)
    retry = OutputSwap(out, created=False)
    retry.replace_previous()
    assert not (out / "metrics.jsonl").exists()
    retry.roll_back()
    assert _tree(out) == original
    again = OutputSwap(out, created=False)
    again.replace_previous()
    (out / "metrics.jsonl").write_text("new")
    again.commit()
    assert _tree(out) == {"metrics.jsonl": b"new", "notes.txt": b"mine"}


# -- 4. two processes == one ---------------------------------------------------------------------------
MULTI_STEPS = 3
# The last motion module's output bias feeds conv_norm_out; with one channel per GroupNorm group
# that normalises a per-channel constant away: its true gradient is 0, so AdamW turns float noise
# (which differs between 1 and 2 processes) into steps of up to lr.


def _last_output_bias(sd: dict) -> str:
    keys = [k for k in sd if k.startswith("up_blocks.") and k.endswith("proj_out.bias")]
    return max(keys, key=lambda k: tuple(int(n) for n in re.findall(r"\d+", k)))


def _launch(cmd: list[str], cwd: Path, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        cmd,
        cwd=cwd,
        env=subprocess_env(**env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _finish(proc: subprocess.Popen) -> subprocess.CompletedProcess:
    stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def _multi_config(out: Path, data: Data, batch_size: int) -> dict:
    return config("motion", out, data.overfit, steps=MULTI_STEPS, batch_size=batch_size)


def _compare_with_one_process(one: Path, other: Path, what: str) -> tuple[float, float]:
    """Largest and mean difference of two 3-step runs' motion modules.

    The sums differ in order between 1 and 2 processes, and AdamW divides by the root of the
    squared gradients, which turns float noise on near-zero gradients into visible steps: after 3
    steps at lr 1e-3 a few elements in a million differ by about 1e-5 (mean 5e-9). Different data
    or each process training alone moves nearly every element by about lr (mean 1e-3)."""
    a = load_tensors(one / "motion_module.safetensors")
    b = load_tensors(other / "motion_module.safetensors")
    key = _last_output_bias(a)  # see above: may differ by up to ~lr per step
    assert (a.pop(key) - b.pop(key)).abs().max() <= 1.5e-3 * MULTI_STEPS
    worst = assert_same_tensors(a, b, what, atol=1e-4)
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    mean = diffs.mean().item()
    assert mean < 1e-7, f"{what}: mean abs difference {mean:.3g} (max {worst:.3g})"
    return worst, mean


@pytest.fixture(scope="module")
def one_process_run(data: Data, tmp_path_factory) -> Path:
    """One process with batch 2 (the reference), through the Python API."""
    from animatediff.training import train

    out = tmp_path_factory.mktemp("one-process") / "out"
    in_child(train, _multi_config(out, data, batch_size=2))
    return out


@pytest.mark.slow  # multi-process training
def test_two_processes_match_one(data: Data, one_process_run: Path, tmp_path: Path):
    """Two gloo processes with batch 1 each == one process with batch 2.

    On a CPU-only machine Accelerate only makes a distributed CPU run when ACCELERATE_USE_CPU is
    set: `accelerate launch --cpu --num_processes 2` starts ONE process (Accelerate 1.x sends
    multi-CPU runs to mpirun), and torchrun or `accelerate launch --multi_gpu` without the variable
    start two processes that each train alone (num_processes 1). What works:
    `ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 ...` (used here) or
    `ACCELERATE_USE_CPU=true torchrun --nproc_per_node 2 -m animatediff.cli.main train ...`."""
    out = tmp_path / "out"
    cfg_file = write_yaml(tmp_path / "cfg2.yaml", _multi_config(out, data, batch_size=1))
    port = str(29500 + os.getpid() % 1000)
    cmd = [
        "accelerate",
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        port,
        "-m",
        "animatediff.cli.main",
        "train",
        str(cfg_file),
    ]
    # A stuck worker prints every thread's stack and exits instead of hanging the test.
    proc = _finish(
        _launch(cmd, tmp_path, ACCELERATE_USE_CPU="true", ANIMATEDIFF_TRACEBACK_AFTER="300")
    )
    assert proc.returncode == 0, describe(proc)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == list(range(1, MULTI_STEPS + 1)), "one writer, a line a step"
    worst, mean = _compare_with_one_process(one_process_run, out, "2 processes x 1 vs 1 x 2")
    print(
        f"2 processes x batch 1 vs 1 process x batch 2: max abs diff {worst:.3g}, mean {mean:.3g}"
    )
    reference = read_metrics(one_process_run)
    for mine, theirs in zip(rows, reference):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-5, abs=1e-6)


@pytest.mark.slow  # multi-process training
def test_torchrun_on_cpu_is_one_distributed_run(data: Data, tmp_path: Path):
    """`torchrun --nproc_per_node 2` on a machine without a GPU: either one data-parallel run
    (one writer: one metrics line a step) or a clear error, never two independent trainings
    racing on the same output folder (what Accelerate does unless ACCELERATE_USE_CPU is set)."""
    out = tmp_path / "out"
    cfg = config("motion", out, data.overfit, steps=1, batch_size=1)
    port = str(30500 + os.getpid() % 1000)
    cmd = [
        "torchrun",
        "--nproc_per_node",
        "2",
        "--master_port",
        port,
        "-m",
        "animatediff.cli.main",
        "train",
        str(write_yaml(tmp_path / "cfg.yaml", cfg)),
    ]
    env = {} if torch.cuda.is_available() else {"CUDA_VISIBLE_DEVICES": ""}
    proc = _finish(_launch(cmd, tmp_path, ANIMATEDIFF_TRACEBACK_AFTER="300", **env))
    if proc.returncode == 0:
        steps = [r["step"] for r in read_metrics(out)]
        assert steps == [1], f"{len(steps)} processes each trained alone: metrics steps {steps}"
    else:
        assert "animatediff: error:" in proc.stderr, describe(proc)


def readme_cpu_launch_command() -> tuple[dict[str, str], list[str]]:
    """The README's command line for training with 2 CPU processes (the line that runs
    `-m animatediff.cli.main train motion.yaml` with a comment mentioning CPU): (env, argv)."""
    readme = Path(__file__).resolve().parents[1] / "README.md"
    for line in readme.read_text().splitlines():
        command, _, comment = line.partition(" #")
        if "animatediff.cli.main train" in command and "CPU" in comment:
            words = shlex.split(command)
            env = {}
            while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
                key, _, value = words.pop(0).partition("=")
                env[key] = value
            return env, words
    pytest.fail(f"{readme} documents no command for training with several CPU processes")


@pytest.mark.slow  # multi-process training
def test_readme_cpu_launch_command_runs_two_processes(
    data: Data, one_process_run: Path, tmp_path: Path
):
    """The README's command for 2 CPU processes, run on a batch-1 config, must match one process
    with batch 2 (it documents `accelerate launch --cpu --num_processes 2`, which Accelerate 1.x
    runs as ONE process)."""
    env, argv = readme_cpu_launch_command()
    out = tmp_path / "out"
    cfg_file = write_yaml(tmp_path / "cfg.yaml", _multi_config(out, data, batch_size=1))
    argv = [str(cfg_file) if w == "motion.yaml" else w for w in argv]
    assert str(cfg_file) in argv, argv
    proc = _finish(_launch(argv, tmp_path, ANIMATEDIFF_TRACEBACK_AFTER="300", **env))
    assert proc.returncode == 0, describe(proc)
    _compare_with_one_process(
        one_process_run, out, f"the README's `{shlex.join(argv)}` (did it start 2 processes?)"
    )


# -- 5. data -------------------------------------------------------------------------------------------
def _dataset(**data_cfg):
    from animatediff.training.config import DataConfig
    from animatediff.training.data import VideoClips, find_clips

    cfg = DataConfig(
        num_frames=FRAMES, sample_size=SIZE, sample_stride=2, num_workers=0, **data_cfg
    )
    return VideoClips(find_clips(cfg), cfg, FRAMES, seed=0)


def _check_items(dataset, expected_captions: dict[str, str]) -> None:
    """Every item: the caption of its video, (3, f, H, W) pixels in [-1, 1], the right colour."""
    colours = {c[4]: torch.tensor(c[1]) for c in CLIPS}
    assert sorted(c.caption for c in dataset.clips) == sorted(expected_captions.values())
    for i in range(len(dataset)):
        item = dataset[i]
        assert item["skipped"] == []
        assert item["caption"] == dataset.clips[i].caption
        pixels = item["pixels"]
        assert pixels.shape == (3, FRAMES, SIZE, SIZE) and pixels.dtype == torch.float32
        assert pixels.min() >= -1 and pixels.max() <= 1
        # The square's colour: the pixels of the first frame far from the background.
        rgb = (pixels[:, 0] + 1) / 2
        square = (rgb - torch.tensor(BACKGROUND).view(3, 1, 1)).abs().sum(0) > 0.6
        assert 100 < square.sum() < 400, int(square.sum())  # a 16x16 square
        colour = rgb[:, square].mean(1)
        assert (colour - colours[item["caption"]]).abs().max() < 0.2, (item["caption"], colour)


def test_folder_dataset_skips_bad_videos_and_is_deterministic(data: Data):
    dataset = _dataset(videos=str(data.clips))
    names = [Path(c.path).stem for c in dataset.clips]
    assert sorted(names) == sorted([c[0] for c in CLIPS] + ["corrupt", "short"])
    for i, name in enumerate(names):
        item = dataset[i]
        assert item["pixels"].shape == (3, FRAMES, SIZE, SIZE)
        if name in ("corrupt", "short"):
            assert len(item["skipped"]) >= 1 and name in item["skipped"][0], item["skipped"]
            assert item["caption"] != (data.clips / f"{name}.txt").read_text().strip()
            if name == "short":
                assert "too short" in item["skipped"][0]
        else:
            assert item["skipped"] == []
            assert item["caption"] == (data.clips / f"{name}.txt").read_text().strip()
    good = [i for i, n in enumerate(names) if n not in ("corrupt", "short")]
    _check_items(_dataset(videos=str(data.overfit)), {c[0]: c[4] for c in CLIPS[:2]})
    again = _dataset(videos=str(data.clips))
    for i in good + [good[0] + len(dataset)]:  # ids of a later epoch too
        assert torch.equal(dataset[i]["pixels"], dataset[i]["pixels"])
        assert torch.equal(dataset[i]["pixels"], again[i]["pixels"])


def test_webvid_csv_dataset(data: Data, tmp_path: Path):
    folder = tmp_path / "webvid"
    rows = []
    for k, (name, *_rest, caption) in enumerate(CLIPS):
        page_dir = f"{k % 2:03d}"
        (folder / page_dir).mkdir(parents=True, exist_ok=True)
        videoid = str(1000 + k)
        shutil.copy(data.clips / f"{name}.mp4", folder / page_dir / f"{videoid}.mp4")
        rows.append({"videoid": videoid, "name": caption, "page_dir": page_dir})
    table = tmp_path / "results_train.csv"
    with table.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["videoid", "name", "page_dir"])
        writer.writeheader()
        writer.writerows(rows)
    dataset = _dataset(csv=str(table), video_folder=str(folder))
    assert len(dataset) == len(CLIPS)
    _check_items(dataset, {c[0]: c[4] for c in CLIPS})


def test_webdataset_shards(data: Data, tmp_path: Path):
    for shard, clips in enumerate((CLIPS[:2], CLIPS[2:])):
        with tarfile.open(tmp_path / f"shard-{shard:03d}.tar", "w") as tar:
            for k, (name, *_rest, caption) in enumerate(clips):
                key = f"{shard:02d}{k + 1:02d}"
                tar.add(data.clips / f"{name}.mp4", arcname=f"{key}.mp4")
                caption_file = tmp_path / f"{key}.txt"
                caption_file.write_text(caption)
                tar.add(caption_file, arcname=f"{key}.txt")
    dataset = _dataset(shards=str(tmp_path / "shard-{000..001}.tar"))
    assert len(dataset) == len(CLIPS)
    assert all(c.member and c.member.endswith(".mp4") for c in dataset.clips)
    _check_items(dataset, {c[0]: c[4] for c in CLIPS})


# -- 6. bad configs fail before training, with one message -----------------------------------------------
@pytest.mark.parametrize(
    "change, words",
    [
        ({"lerning_rate_typo": 1}, ["lerning_rate_typo"]),
        ({"train": {"lerning_rate": 1e-4}}, ["train.", "lerning_rate"]),
        ({"data": {"videos": "x", "num_frame": 4}}, ["data.", "num_frame"]),
        ({"train": {"noise": {"ofset_noise": 0.1}}}, ["train.noise.", "ofset_noise"]),
        ({"stage": "motion_lora"}, ["motion_lora", "motion_module"]),
        ({"stage": "video"}, ["stage", "video"]),
        ({"data": {"videos": "x", "sample_size": 60}}, ["sample_size"]),
        ({"train": {"noise": {"timesteps": [500, 200]}}}, ["noise.timesteps", "500", "200"]),
        ({"train": {"noise": {"timesteps": [0, 1001]}}}, ["noise.timesteps", "1001"]),
    ],
)
def test_bad_config_is_rejected_when_parsed(change: dict, words: list[str]):
    from animatediff.training import ConfigError, parse_config

    cfg = {"stage": "motion", "base": random_base(), "output_dir": "out", "data": {"videos": "x"}}
    cfg.update(change)
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    message = str(e.value)
    assert all(w in message for w in words), message
    assert "\n" not in message


def test_bad_configs_fail_before_training_with_one_line(data: Data, tmp_path: Path):
    """Through the CLI's `main()` (exit 2, one line on stderr) and before anything is trained."""
    cases = {
        "missing-folder": (
            {"data": {"videos": str(tmp_path / "nowhere")}},
            ["not found", "nowhere"],
        ),
        "empty-folder": ({"data": {"videos": str(data.empty)}}, ["empty"]),
        "too-many-frames": (
            {
                "motion_module": str(data.motion_module),
                "data": {"videos": str(data.long), "num_frames": 40},
            },
            ["40", "32", "max_frames"],
        ),
        "longer-than-the-clips": ({"data": {"num_frames": 40}}, ["data.num_frames", "40", "12"]),
        "lora-without-module": ({"stage": "motion_lora"}, ["motion_module"]),
        "nested-unknown": ({"train": {"lerning_rate": 1e-4}}, ["lerning_rate"]),
    }
    failures = []
    for name, (change, words) in cases.items():
        out = tmp_path / name
        cfg = merged(config("motion", out, data.overfit), change)
        code, _, stderr = run_cli_main(["train", str(write_yaml(tmp_path / f"{name}.yaml", cfg))])
        lines = stderr.strip().splitlines()
        ok = (
            code == 2
            and len(lines) == 1
            and lines[0].startswith("animatediff: error:")
            and all(w in lines[0] for w in words)
        )
        if not ok:
            failures.append(f"{name}: exit {code}, stderr {stderr!r}, wanted {words}")
        assert not (out / "metrics.jsonl").exists() and not (out / "checkpoints").exists()
    # Raising max_frames for a continued module is the documented way to train longer clips.
    from animatediff.training import Trainer, parse_config

    def raised_limit() -> int:
        cfg = config(
            "motion",
            tmp_path / "raised",
            data.long,
            motion_module=str(data.motion_module),
            motion_module_config={"max_frames": 48},
            data={"num_frames": 40},
        )
        trainer = Trainer(parse_config(cfg))
        return trainer.accelerator.unwrap_model(trainer.model).motion.config.max_frames

    assert in_child(raised_limit) == 48
    assert not failures, "\n".join(failures)


TYPE_MISTAKES = {  # YAML text of a `train:` or `data:` entry -> words the one-line error holds
    "train: {steps: ten}": ["train.steps", "ten", "integer"],
    "train: {batch_size: 0}": ["train.batch_size", "0", "at least 1"],
    "train: {log_every: 0}": ["train.log_every", "at least 1"],
    "train: {seed: []}": ["train.seed", "[]"],
    "train: {learning_rate: .nan}": ["train.learning_rate", "finite"],
    "train: {learning_rate: -.inf}": ["train.learning_rate", "finite"],
    "train: {learning_rate: 1e999}": ["train.learning_rate", "finite"],
    "data: {num_frames: 40}": ["data.num_frames", "40", "longer than the clips"],
    "train: {noise: {offset_noise: nan}}": ["train.noise.offset_noise", "finite"],
    "distill: {guidance_scale: [8, 2]}": ["distill.guidance_scale", "lo <= hi"],
}


def test_config_type_mistakes_exit_2_naming_the_key_before_any_model_loads(
    data: Data, tmp_path: Path
):
    """Each mistake in a real YAML file through `animatediff train`: exit 2, one line naming the
    key. The config's `base` does not exist: the mistake is reported before the model would have
    failed to load. A config path that is a folder is one line too."""
    failures = []
    cases = {**TYPE_MISTAKES, "FOLDER": ["is a folder"]}
    for i, (text, words) in enumerate(cases.items()):
        cfg = config("motion", tmp_path / f"out{i}", data.overfit)
        cfg["base"] = str(tmp_path / "no-such-base")
        cfg_file = tmp_path / f"cfg{i}.yaml"
        if text == "FOLDER":
            cfg_file.mkdir()
        else:
            write_yaml(cfg_file, merged(cfg, yaml.safe_load(text)))
        code, _, stderr = run_cli_main(["train", str(cfg_file)])
        lines = stderr.strip().splitlines()
        if not (code == 2 and len(lines) == 1 and all(w in lines[0] for w in words)):
            failures.append(f"{text}: exit {code}, stderr {stderr!r}, wanted {words}")
        if (tmp_path / f"out{i}").exists():
            failures.append(f"{text}: output_dir was created")
    assert not failures, "\n".join(failures)


def test_numbers_written_as_yaml_strings_are_read(tmp_path: Path):
    """`learning_rate: 1e-3` is a string to YAML (no dot): it must simply work, as must other
    numbers given as strings; the file's values reach the config as numbers."""
    from animatediff.training import load_config

    text = """
stage: motion
output_dir: out
data: {videos: clips, sample_size: "64", caption_dropout: "0.1"}
train: {learning_rate: 1e-3, steps: "20", warmup_steps: 2, noise: {timesteps: ["100", 900]}}
distill: {guidance_scale: 3}
"""
    cfg_file = tmp_path / "cfg.yaml"
    cfg_file.write_text(text)
    assert yaml.safe_load(text)["train"]["learning_rate"] == "1e-3"  # what YAML does
    cfg = load_config(cfg_file)
    assert cfg.train.learning_rate == 0.001 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.steps == 20 and cfg.data.sample_size == (64, 64)
    assert cfg.data.caption_dropout == 0.1 and cfg.train.noise.timesteps == (100, 900)
    assert cfg.distill.guidance_scale == (3.0, 3.0)


# The fuzz test: configs built from the schema's own fields, with values of every kind.
_JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6),
    st.sampled_from(["1e-3", "nan", "-inf", "1e999", "0", "-1", "7", "ten", "0x10", " 3 "]),
    st.lists(st.one_of(st.integers(-5, 2000), st.floats(), st.text(max_size=3)), max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
)


def _plausible(f) -> st.SearchStrategy:
    """Values a user would write for field `f` (valid or near the limits)."""
    meta = f.metadata
    if "choices" in meta:
        return st.sampled_from(list(meta["choices"]) + ["other"])
    kind = meta.get("kind")
    if kind is bool:
        return st.booleans()
    if kind is int:
        lo, hi = meta.get("minimum", -3) - 1, min(meta.get("maximum", 5000), 5000) + 1
        ints = st.integers(min_value=lo, max_value=hi)
        return (
            st.one_of(ints, st.lists(ints, min_size=1, max_size=3))
            if meta.get("sequence")
            else ints
        )
    if kind is float:
        floats = st.floats(min_value=-1, max_value=40, allow_nan=False)
        return (
            st.one_of(floats, st.lists(floats, min_size=1, max_size=3))
            if meta.get("sequence")
            else floats
        )
    return st.text(max_size=8)


@st.composite
def _training_configs(draw) -> tuple[dict, set[str]]:
    """A config dict and the dotted names of every key in it."""
    import dataclasses

    from animatediff.training.config import SECTIONS, STAGES, Config

    def section(cls, where: str) -> dict:
        fields = [f for f in dataclasses.fields(cls) if f.name not in SECTIONS]
        chosen = draw(st.lists(st.sampled_from(fields), unique=True, max_size=4))
        out = {}
        for f in chosen:  # mostly what a user would write, sometimes anything at all
            out[f.name] = draw(_JUNK if draw(st.sampled_from(range(8))) == 5 else _plausible(f))
        if draw(st.sampled_from(range(40))) == 5:
            out[draw(st.sampled_from(["lerning_rate", "num_frame", "x"]))] = 1
        return out

    cfg = {
        "stage": draw(st.sampled_from([*STAGES, "video"])),
        "output_dir": draw(st.sampled_from(["out", 3, None])),
        "data": {"videos": "clips", **section(SECTIONS["data"], "data.")},
        "motion_module": draw(st.sampled_from(["mm.safetensors", None])),
        **section(Config, ""),
    }
    for name in ("train", "validation", "checkpoint", "distill", "motion_module_config"):
        if draw(st.booleans()):
            cfg[name] = section(SECTIONS[name], f"{name}.")
    if draw(st.booleans()):
        cfg.setdefault("train", {})["noise"] = section(SECTIONS["noise"], "train.noise.")
    if draw(st.sampled_from(range(20))) == 5:
        cfg[draw(st.sampled_from(["train", "data", "distill"]))] = draw(_JUNK)
    keys = set()

    def collect(d, prefix: str) -> None:
        for k, v in d.items():
            keys.add(f"{prefix}{k}")
            if isinstance(v, dict) and k in (*SECTIONS, "noise"):
                collect(v, f"{prefix}{k}.")

    collect(cfg, "")
    return cfg, keys


STRUCTURAL = ("config needs", "data needs one of", "needs 'motion_module'", "must be a mapping")


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_training_configs())
def test_fuzz_training_config(case):
    """Whatever the values: a valid config (every number finite, re-parsing it gives it back)
    or a ConfigError of one line naming a key that is in the config."""
    import math

    from animatediff.errors import ConfigError
    from animatediff.training import parse_config

    cfg, keys = case
    try:
        parsed = parse_config(cfg)
    except ConfigError as e:
        message = str(e)
        assert "\n" not in message
        named = [k for k in keys if k in message]
        assert named or any(s in message for s in STRUCTURAL), (message, sorted(keys))
        return
    numbers = [
        parsed.train.learning_rate,
        parsed.train.max_grad_norm,
        *parsed.distill.guidance_scale,
    ]
    assert all(math.isfinite(x) for x in numbers)
    assert parse_config(parsed.to_dict()) == parsed


@pytest.mark.slow  # a real process
def test_cli_malformed_yaml_exits_2_with_one_line(tmp_path: Path):
    """A real `animatediff train` process (the other bad configs go through `main()` above)."""
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("stage: motion\ndata: {videos: [unclosed\ntrain:\n  steps: 2\n")
    proc = run_process(["animatediff", "train", str(bad_yaml)], tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, describe(proc)
    assert len(lines) == 1, f"want one line on stderr\n{describe(proc)}"
    assert lines[0].startswith("animatediff: error:")
    assert "bad.yaml" in lines[0] and "YAML" in lines[0]


# -- 7. pre-encoding -----------------------------------------------------------------------------------------
def test_encode_then_train_from_cache(data: Data, tmp_path: Path):
    from animatediff.training import train

    cache = tmp_path / "latents"
    cfg_file = write_yaml(
        tmp_path / "cfg.yaml", config("motion", tmp_path / "unused", data.overfit)
    )
    code, stdout, stderr = run_cli_main(["train", str(cfg_file), "--encode", str(cache)])
    assert code == 0, stderr
    assert "encoded 2 clips" in stdout
    files = sorted(cache.glob("*.safetensors"))
    assert len(files) == 2, files
    captions = set()
    for file in files:
        with safetensors.safe_open(str(file), "pt") as f:
            captions.add(f.metadata()["caption"])
            assert f.get_tensor("mean").shape == (4, FRAMES, SIZE // 4, SIZE // 4)
            assert (f.get_tensor("std") > 0).all()
    assert captions == {CLIPS[0][4], CLIPS[1][4]}

    out = tmp_path / "from-cache"
    cfg = config("motion", out, data.overfit, steps=2)
    cfg["data"] = {"cache": str(cache), "num_frames": FRAMES, "sample_size": SIZE, "num_workers": 0}
    results = in_child(train, cfg)
    assert [Path(p).name for p in results] == [
        "motion_module.safetensors",
        "motion_module_diffusers",
    ]
    assert [r["step"] for r in read_metrics(out)] == [1, 2]
    assert all(r["loss"] > 0 for r in read_metrics(out))


def test_encode_reports_unreadable_clips_instead_of_duplicating(data: Data, tmp_path: Path):
    """Encoding a folder with a corrupt and a too-short video: each readable clip once, and the
    bad ones reported (not silently replaced by copies of their neighbour)."""
    cache = tmp_path / "latents"
    cfg_file = write_yaml(tmp_path / "cfg.yaml", config("motion", tmp_path / "unused", data.mixed))
    code, stdout, stderr = run_cli_main(["train", str(cfg_file), "--encode", str(cache)])
    assert code == 0, stderr
    means = [load_tensors(f)["mean"] for f in sorted(cache.glob("*.safetensors"))]
    duplicates = sum(torch.equal(a, b) for i, a in enumerate(means) for b in means[i + 1 :])
    problems = []
    if duplicates or len(means) != 1:
        problems.append(f"{len(means)} files for 1 readable clip ({duplicates} duplicate pairs)")
    log = stdout + stderr
    if "corrupt" not in log or "short" not in log:
        problems.append(f"the skipped videos are not reported; stderr: {stderr[-500:]!r}")
    assert not problems, "; ".join(problems)


def test_timestep_range_bounds_the_drawn_timesteps():
    """`noise.timesteps: [lo, hi]` draws every training timestep from [lo, hi); the default
    spans the whole schedule."""
    from animatediff.training.config import NoiseConfig
    from animatediff.training.loss import diffusion_loss, make_noise_scheduler

    seen: list[int] = []

    def predict(x, t):
        seen.extend(t.tolist())
        return torch.zeros_like(x)

    latents = torch.randn(64, 4, 2, 4, 4)
    for noise, lo, hi in (
        (NoiseConfig(timesteps=(700, 1000)), 700, 1000),
        (NoiseConfig(), 0, 1000),
    ):
        seen.clear()
        gens = [torch.Generator().manual_seed(i) for i in range(64)]
        diffusion_loss(predict, latents, make_noise_scheduler(noise), noise, gens)
        assert lo <= min(seen) and max(seen) < hi, (lo, hi, min(seen), max(seen))
    assert min(seen) < 300  # the default really spans the schedule


@pytest.mark.parametrize("name", ["random_states_0.pkl", "optimizer.bin", "scheduler.bin"])
def test_resume_never_runs_code_from_a_checkpoint(data: Data, tmp_path: Path, name: str):
    """A checkpoint file replaced by a pickle whose loading would run code: `--resume` stops
    with one line naming the file (exit 2), and the code never runs."""
    from cli_helpers import write_evil

    out = tmp_path / "run"
    cfg = config("motion", out, data.overfit, steps=2, checkpoint={"every": 1, "keep": 5})
    cfg_file = write_yaml(tmp_path / "cfg.yaml", cfg)
    assert run_cli_main(["train", str(cfg_file)])[0] == 0
    latest = max((out / "checkpoints").glob("step-*"), key=lambda p: int(p.name[5:]))
    marker = tmp_path / "ran"
    write_evil(latest / name, marker)
    code, _, stderr = run_cli_main(["train", str(cfg_file), "--resume"])
    lines = stderr.strip().splitlines()
    assert not marker.exists(), "unpickling ran code"
    assert code == 2 and len(lines) == 1 and name in lines[0], (code, stderr)
