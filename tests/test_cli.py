"""End-to-end tests of the `animatediff` command line: the real CLI in subprocesses, no mocks.

Every CLI process pays several seconds of imports (torch, diffusers, transformers), so the file
would take minutes if its two dozen invocations ran one after another. Instead each invocation (or
chain of dependent invocations) is a *job*: the first test to need one starts every job the
selected tests need on a small thread pool (one single-threaded process per core), and each test
waits for its own job and checks the results. `pytest -k` still only runs what it selects.

The built-in model is built once per session into a temporary `ANIMATEDIFF_CACHE`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import av
import pytest
import safetensors.torch
import torch

REF = Path(__file__).parent / "data" / "official_tiny"
PROMPT = "a red circle moving on a blue background"
FAST = ("--steps", "2", "--frames", "8")
# The reference base at 128x128 (16x16 latents): a custom base needs an explicit motion module.
TINY_BASE = ("--base", str(REF / "base"), "--width", "128", "--height", "128")
CLI_TIMEOUT = 600  # seconds per process; generous, as other test runs may share the CPU
NEGATIVE = "worst quality, low quality"


# -- running the CLI -----------------------------------------------------------------------------
@dataclass(frozen=True)
class Run:
    """One finished `animatediff` process."""

    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str
    cwd: Path

    def __str__(self) -> str:  # what an assertion failure shows
        return (
            f"animatediff {' '.join(self.args)}  (in {self.cwd}, exit {self.returncode})\n"
            f"--- stdout\n{self.stdout}--- stderr\n{self.stderr}"
        )

    def saved(self) -> list[str]:
        return [
            line[len("saved ") :] for line in self.stdout.splitlines() if line.startswith("saved ")
        ]


def cli(cwd: Path, env: dict[str, str], *args: object) -> Run:
    argv = tuple(str(a) for a in args)
    proc = subprocess.run(
        [sys.executable, "-m", "animatediff.cli.main", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
    )
    return Run(argv, proc.returncode, proc.stdout, proc.stderr, cwd)


def assert_ok(run: Run) -> None:
    assert run.returncode == 0, run
    assert "Traceback" not in run.stderr, run


def assert_usage_error(run: Run, *needles: str) -> str:
    """Exit 2, exactly one `animatediff: error: ...` line on stderr, no traceback."""
    assert run.returncode == 2, run
    assert "Traceback" not in run.stderr, run
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run
    assert lines[0].startswith("animatediff: error: "), run
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in the message\n{run}"
    assert not run.stdout.strip(), run
    return lines[0]


# -- jobs: CLI invocations started together, checked by the tests --------------------------------
JOBS: dict[str, Callable[[Path, dict[str, str]], object]] = {}


def job(fn: Callable[[Path, dict[str, str]], object]) -> Callable:
    """Register `fn(cwd, env)`; jobs start in definition order, so longest chains come first."""
    JOBS[fn.__name__] = fn
    return fn


def needs(*names: str) -> Callable:
    """Mark a test with the jobs it reads, so the session starts exactly those."""

    def mark(test: Callable) -> Callable:
        test.cli_jobs = names
        return test

    return mark


class Jobs:
    def __init__(self, factory: pytest.TempPathFactory, env: dict[str, str], workers: int):
        self.factory, self.env = factory, env
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="cli-job")
        self.futures: dict[str, Future] = {}

    def start(self, name: str) -> None:
        if name not in self.futures:
            cwd = self.factory.mktemp(name)
            self.futures[name] = self.pool.submit(JOBS[name], cwd, self.env)

    def __getitem__(self, name: str):
        self.start(name)
        return self.futures[name].result()


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    return {
        **os.environ,
        "ANIMATEDIFF_CACHE": str(tmp_path_factory.mktemp("animatediff-cache")),
        # One thread per process: the processes run side by side, and oversubscribed OpenMP
        # threads on a busy machine make the first denoising step ten times slower.
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
    }


@pytest.fixture(scope="session")
def jobs(request: pytest.FixtureRequest, tmp_path_factory, cli_env):
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    runner = Jobs(tmp_path_factory, cli_env, workers=min(8, (cpus or 2) + 1))
    wanted = {
        n
        for item in request.session.items
        for n in getattr(getattr(item, "function", None), "cli_jobs", ())
    }
    for name in JOBS:
        if name in wanted:
            runner.start(name)
    yield runner
    runner.pool.shutdown(wait=True, cancel_futures=True)


# The job definitions, longest chains first.
@job
def builtin_gif(cwd: Path, env: dict[str, str]) -> dict:
    """Built-in model: generate, the same command again (refused), then with --overwrite."""
    args = ("generate", PROMPT, *FAST, "-o", "out.gif", "--seed", "3")
    result: dict = {"first": cli(cwd, env, *args)}
    if result["first"].returncode != 0:
        return result
    first = cwd / "first"
    first.mkdir()
    for name in ("out.gif", "out.gif.json"):
        shutil.copyfile(cwd / name, first / name)
    result["again"] = cli(cwd, env, *args)
    result["untouched"] = (cwd / "out.gif").read_bytes() == (first / "out.gif").read_bytes()
    result["overwrite"] = cli(cwd, env, *args, "--overwrite")
    return result


@job
def convert_motion(cwd: Path, env: dict[str, str]) -> dict:
    """Original .ckpt -> diffusers folder -> original .safetensors (and .ckpt)."""
    result = {"to_diffusers": cli(cwd, env, "convert", REF / "mm_v2.ckpt", "out_diffusers")}
    if result["to_diffusers"].returncode == 0:
        result["back"] = cli(cwd, env, "convert", "out_diffusers", "back.safetensors")
        result["back_ckpt"] = cli(cwd, env, "convert", "out_diffusers", "back.ckpt")
    return result


V2_CONFIG = f"""\
# The official v1/v2 prompt-config shape: named entries, paths relative to the working folder.
TinyPersonal:
  inference_config: "configs/inference/inference-v2.yaml"
  motion_module:
    - "models/Motion_Module/mm_v2.ckpt"
  motion_module_lora_configs:
    - path: "models/MotionLoRA/motion_lora_v2.ckpt"
      alpha: 0.7
  dreambooth_path: "models/DreamBooth_LoRA/personal_ldm.safetensors"
  lora_model_path: ""
  seed: [1, 2]
  steps: 2
  guidance_scale: 7.5
  prompt:
    - "a boy playing guitar, best quality"
    - "{PROMPT}"
  n_prompt:
    - "{NEGATIVE}"
  W: 128
  H: 64
  L: 8
"""

V3_CONFIG = f"""\
# The official v3 prompt-config shape: a list of entries.
- dreambooth_path: ""
  lora_model_path: ""
  inference_config: "configs/inference/inference-v3.yaml"
  motion_module: {json.dumps(str(REF / "mm_v3.ckpt"))}
  adapter_lora_path: {json.dumps(str(REF / "domain_adapter_v3.ckpt"))}
  adapter_lora_scale: 1.0
  seed: [7]
  steps: 2
  guidance_scale: 8.5
  prompt:
    - "a boy playing guitar"
  n_prompt:
    - "{NEGATIVE}"
  W: 64
  H: 128
  L: 6
"""


@job
def config_v2(cwd: Path, env: dict[str, str]) -> Run:
    for sub, name in (
        ("Motion_Module", "mm_v2.ckpt"),
        ("MotionLoRA", "motion_lora_v2.ckpt"),
        ("DreamBooth_LoRA", "personal_ldm.safetensors"),
    ):
        (cwd / "models" / sub).mkdir(parents=True)
        shutil.copyfile(REF / name, cwd / "models" / sub / name)
    (cwd / "tiny-v2.yaml").write_text(V2_CONFIG)
    return cli(
        cwd, env, "generate", "--config", "tiny-v2.yaml", "--base", REF / "base", "-o", "out"
    )


@job
def config_v3(cwd: Path, env: dict[str, str]) -> Run:
    (cwd / "tiny-v3.yaml").write_text(V3_CONFIG)
    return cli(
        cwd, env, "generate", "--config", "tiny-v3.yaml", "--base", REF / "base", "-o", "out"
    )


@job
def reference_mp4(cwd: Path, env: dict[str, str]) -> Run:
    return cli(
        cwd, env, "generate", "a boy playing guitar", *FAST, *TINY_BASE,
        "--motion-module", REF / "mm_v2.ckpt",
        "--motion-lora", f"{REF / 'motion_lora_v2.ckpt'}:0.7",
        "--seed", "5", "-o", "out.mp4",
    )  # fmt: skip


@job
def convert_personal(cwd: Path, env: dict[str, str]) -> Run:
    return cli(
        cwd, env, "convert", REF / "personal_ldm.safetensors", "folder", "--base", REF / "base"
    )


class Evil:
    """Unpickling this runs `touch PWNED` -- unless the loader refuses it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


@job
def error_malicious(cwd: Path, env: dict[str, str]) -> Run:
    # As an attacker would ship it: a torch.save() archive that looks like a motion module.
    key = "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"
    torch.save({key: torch.ones(32), "payload": Evil()}, cwd / "evil.ckpt")
    return cli(cwd, env, "generate", PROMPT, *FAST, *TINY_BASE, "--motion-module", "evil.ckpt")


@job
def error_truncated(cwd: Path, env: dict[str, str]) -> Run:
    data = (REF / "mm_v2.ckpt").read_bytes()
    (cwd / "mm_cut.ckpt").write_bytes(data[: len(data) // 2])  # an interrupted download
    return cli(cwd, env, "generate", PROMPT, *FAST, *TINY_BASE, "--motion-module", "mm_cut.ckpt")


@job
def error_missing_debug(cwd: Path, env: dict[str, str]) -> Run:
    return cli(cwd, env, "--debug", "generate", PROMPT, *FAST, "--motion-module", "missing.ckpt")


@job
def error_bad_yaml(cwd: Path, env: dict[str, str]) -> Run:
    (cwd / "broken.yaml").write_text('Entry:\n  prompt: ["unclosed\n  motion_module: mm.ckpt\n')
    return cli(cwd, env, "generate", "--config", "broken.yaml", "-o", "out")


# Plain usage mistakes: arguments, then phrases the one-line message must contain.
USAGE_ERRORS = {
    "missing_motion_module": (
        ("generate", PROMPT, *FAST, "--motion-module", "missing.ckpt", "-o", "a.gif"),
        ("--motion-module", "missing.ckpt", "not found"),
    ),
    "width": (("generate", PROMPT, *FAST, "--width", "100"), ("--width 100", "multiple of 8")),
    "scheduler": (
        ("generate", PROMPT, *FAST, "--scheduler", "no-such-sampler"),
        ("no-such-sampler", "ddim"),
    ),
    "lora_strength": (
        ("generate", PROMPT, *FAST, "--lora", "x.safetensors:abc"),
        ("'abc'", "x.safetensors", "PATH[:STRENGTH]"),
    ),
}


def _usage_job(args: tuple[str, ...]) -> Callable[[Path, dict[str, str]], Run]:
    def run(cwd: Path, env: dict[str, str]) -> Run:
        # The LoRA exists, so only the strength syntax can be at fault.
        safetensors.torch.save_file({"w": torch.zeros(1)}, cwd / "x.safetensors")
        return cli(cwd, env, *args)

    return run


for _name, (_args, _) in USAGE_ERRORS.items():
    JOBS[f"error_{_name}"] = _usage_job(_args)

INSPECT = {
    "inspect_v1": ("mm_v1.ckpt",),
    "inspect_v2": ("mm_v2.ckpt", "--json"),
    "inspect_v3": ("mm_v3.ckpt", "--json"),
    "inspect_motion_lora": ("motion_lora_v2.ckpt",),
    "inspect_kohya": ("kohya_lora.safetensors",),
}


def _inspect_job(name: str, *flags: str) -> Callable[[Path, dict[str, str]], Run]:
    return lambda cwd, env: cli(cwd, env, "inspect", REF / name, *flags)


for _name, (_file, *_flags) in INSPECT.items():
    JOBS[_name] = _inspect_job(_file, *_flags)


def read_video(path: Path) -> torch.Tensor:
    # Imported when first used, not at collection: `animatediff` pulls in diffusers (seconds of
    # CPU), and the CLI jobs should not wait for that.
    from animatediff.video import read_video

    return read_video(path)


def video_info(path: Path):
    from animatediff.video import video_info

    return video_info(path)


# -- generate with the built-in model ------------------------------------------------------------
@needs("builtin_gif")
def test_generate_builtin_gif(jobs: Jobs) -> None:
    run = jobs["builtin_gif"]["first"]
    assert_ok(run)
    assert "saved out.gif" in run.stdout.splitlines(), run
    first = run.cwd / "first"
    info = video_info(first / "out.gif")
    assert (info.num_frames, info.width, info.height) == (8, 64, 64)
    assert info.fps == pytest.approx(8, rel=0.05)  # GIF stores 1/100 s: 125 ms -> 120 ms
    frames = read_video(first / "out.gif")
    assert frames.shape == (3, 8, 64, 64)
    assert frames.std() > 0.01  # not a blank picture
    assert not torch.equal(frames[:, 0], frames[:, -1])  # it moves
    settings = json.loads((first / "out.gif.json").read_text())
    assert settings["seed"] == 3
    assert settings["prompt"] == [PROMPT]
    assert (settings["num_frames"], settings["num_inference_steps"]) == (8, 2)
    assert settings["outputs"] == ["out.gif"]


@needs("builtin_gif")
def test_existing_output_needs_overwrite(jobs: Jobs) -> None:
    result = jobs["builtin_gif"]
    assert_ok(result["first"])
    message = assert_usage_error(result["again"], "out.gif", "--overwrite")
    assert "already exists" in message
    assert result["untouched"], "the refused run changed out.gif"
    assert_ok(result["overwrite"])
    assert "saved out.gif" in result["overwrite"].stdout.splitlines(), result["overwrite"]


@needs("builtin_gif")
def test_same_seed_same_frames(jobs: Jobs) -> None:
    result = jobs["builtin_gif"]
    assert_ok(result["overwrite"])
    cwd = result["overwrite"].cwd
    assert torch.equal(read_video(cwd / "first" / "out.gif"), read_video(cwd / "out.gif"))
    settings = json.loads((cwd / "out.gif.json").read_text())
    assert settings["seed"] == 3


# -- generate with the reference models ----------------------------------------------------------
@needs("reference_mp4")
def test_generate_mp4_with_motion_lora(jobs: Jobs) -> None:
    run = jobs["reference_mp4"]
    assert_ok(run)
    assert run.saved() == ["out.mp4"], run
    out = run.cwd / "out.mp4"
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    info = video_info(out)
    assert (info.num_frames, info.width, info.height) == (8, 128, 128)
    assert read_video(out).shape == (3, 8, 128, 128)
    settings = json.loads((run.cwd / "out.mp4.json").read_text())
    assert settings["seed"] == 5
    assert settings["motion_loras"] == {"motion_lora_v2": 0.7}
    assert Path(settings["models"]["motion_module"]).name == "mm_v2.ckpt"


def _config_outputs(run: Run, count: int) -> list[tuple[Path, dict]]:
    assert_ok(run)
    videos = sorted((run.cwd / "out").glob("*.gif"))
    assert len(videos) == count, run
    assert sorted(run.saved()) == [str(Path("out") / v.name) for v in videos], run
    return [(v, json.loads(v.with_name(v.name + ".json").read_text())) for v in videos]


@needs("config_v2")
def test_config_v2_mapping_form(jobs: Jobs) -> None:
    outputs = _config_outputs(jobs["config_v2"], 2)
    prompts = ["a boy playing guitar, best quality", PROMPT]
    for (video, settings), prompt, seed in zip(outputs, prompts, [1, 2], strict=True):
        info = video_info(video)
        assert (info.num_frames, info.width, info.height) == (8, 128, 64), video  # L, W, H
        assert settings["prompt"] == [prompt]
        assert settings["negative_prompt"] == [NEGATIVE]  # one n_prompt serves every prompt
        assert settings["seed"] == seed
        assert (settings["num_inference_steps"], settings["guidance_scale"]) == (2, 7.5)
        assert settings["motion_loras"] == {"motion_lora_v2": 0.7}
        models = settings["models"]
        assert Path(models["personal"]).name == "personal_ldm.safetensors"
        assert Path(models["motion_module"]).name == "mm_v2.ckpt"
        assert models["loras"] == []  # lora_model_path: ""


@needs("config_v3")
def test_config_v3_list_form_with_adapter(jobs: Jobs) -> None:
    ((video, settings),) = _config_outputs(jobs["config_v3"], 1)
    info = video_info(video)
    assert (info.num_frames, info.width, info.height) == (6, 64, 128)  # L, W, H
    assert settings["prompt"] == ["a boy playing guitar"]
    assert settings["negative_prompt"] == [NEGATIVE]
    assert settings["seed"] == 7
    assert (settings["num_inference_steps"], settings["guidance_scale"]) == (2, 8.5)
    models = settings["models"]
    assert models["adapter"] == [str(REF / "domain_adapter_v3.ckpt"), 1.0]
    assert Path(models["motion_module"]).name == "mm_v3.ckpt"
    assert models["personal"] is None  # dreambooth_path: ""


# -- user mistakes -------------------------------------------------------------------------------
@needs(*(f"error_{name}" for name in USAGE_ERRORS))
@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_usage_error(jobs: Jobs, name: str) -> None:
    assert_usage_error(jobs[f"error_{name}"], *USAGE_ERRORS[name][1])


@needs("error_truncated")
def test_truncated_motion_module(jobs: Jobs) -> None:
    message = assert_usage_error(jobs["error_truncated"], "mm_cut.ckpt")
    assert re.search(r"truncated|corrupt", message), message


@needs("error_malicious")
def test_malicious_pickle_is_refused(jobs: Jobs) -> None:
    run = jobs["error_malicious"]
    assert_usage_error(run, "evil.ckpt", "refused for safety")
    assert not (run.cwd / "PWNED").exists(), "the pickle's payload ran"
    assert (run.cwd / "evil.ckpt").exists()  # sanity: the file was really there


@needs("error_missing_debug")
def test_debug_shows_traceback(jobs: Jobs) -> None:
    run = jobs["error_missing_debug"]
    assert run.returncode not in (0, 2), run
    assert "Traceback (most recent call last)" in run.stderr, run
    assert "missing.ckpt" in run.stderr, run


@needs("error_bad_yaml")
def test_malformed_config_is_a_usage_error(jobs: Jobs) -> None:
    assert_usage_error(jobs["error_bad_yaml"], "broken.yaml")


# -- inspect -------------------------------------------------------------------------------------
@needs(*INSPECT)
def test_inspect_motion_modules(jobs: Jobs) -> None:
    text = jobs["inspect_v1"]
    assert_ok(text)
    assert re.search(r"^kind\s+motion module$", text.stdout, re.M), text
    assert re.search(r"^version\s+v1$", text.stdout, re.M), text
    for name, key, value in (("inspect_v2", "version", "v2"), ("inspect_v3", "dtype", "fp16")):
        run = jobs[name]
        assert_ok(run)
        info = json.loads(run.stdout)
        assert info["kind"] == "motion module", run
        assert info[key] == value, run
    assert json.loads(jobs["inspect_v3"].stdout)["version"] == "v3"


@needs(*INSPECT)
def test_inspect_loras(jobs: Jobs) -> None:
    motion_lora, kohya = jobs["inspect_motion_lora"], jobs["inspect_kohya"]
    assert_ok(motion_lora)
    assert re.search(r"^kind\s+MotionLoRA$", motion_lora.stdout, re.M), motion_lora
    assert_ok(kohya)
    assert re.search(r"^kind\s+.*kohya", kohya.stdout, re.M), kohya


# -- convert -------------------------------------------------------------------------------------
def _bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        x, y = a[key], b[key]
        assert (x.dtype, x.shape) == (y.dtype, y.shape), key
        assert (
            x.contiguous()
            .flatten()
            .view(torch.uint8)
            .equal(y.contiguous().flatten().view(torch.uint8))
        ), key


def _original_without_pe() -> dict[str, torch.Tensor]:
    sd = torch.load(REF / "mm_v2.ckpt", map_location="cpu", weights_only=True)
    return {k: v for k, v in sd.items() if not k.endswith("pos_encoder.pe")}


@needs("convert_motion")
def test_convert_motion_module_round_trip(jobs: Jobs) -> None:
    result = jobs["convert_motion"]
    to_diffusers = result["to_diffusers"]
    assert_ok(to_diffusers)
    folder = to_diffusers.cwd / "out_diffusers"
    assert to_diffusers.saved() == ["out_diffusers"], to_diffusers
    config = json.loads((folder / "config.json").read_text())
    assert config["_class_name"] == "MotionAdapter"
    assert config["use_motion_mid_block"] is True  # v2
    keys = safetensors.torch.load_file(folder / "diffusion_pytorch_model.safetensors")
    assert any(".attn1." in k for k in keys) and not any(".attention_blocks." in k for k in keys)

    from diffusers import MotionAdapter  # diffusers itself reads the folder

    _, loading = MotionAdapter.from_pretrained(folder, output_loading_info=True)
    assert not any(loading.values()), loading

    back = result["back"]
    assert_ok(back)
    assert back.saved() == ["back.safetensors"], back
    _bitwise_equal(
        safetensors.torch.load_file(back.cwd / "back.safetensors"), _original_without_pe()
    )


@needs("convert_motion")
def test_convert_motion_module_to_ckpt(jobs: Jobs) -> None:
    run = jobs["convert_motion"]["back_ckpt"]
    assert_ok(run)
    back = torch.load(run.cwd / "back.ckpt", map_location="cpu", weights_only=True)
    # A .ckpt carries no metadata, so like the released files it stores `pos_encoder.pe`
    # buffers (which tell the version on reload); the weights themselves are bitwise equal.
    _bitwise_equal(
        {k: v for k, v in back.items() if not k.endswith("pos_encoder.pe")}, _original_without_pe()
    )
    original = torch.load(REF / "mm_v2.ckpt", map_location="cpu", weights_only=True)
    pe_keys = sorted(k for k in original if k.endswith("pos_encoder.pe"))
    assert sorted(k for k in back if k.endswith("pos_encoder.pe")) == pe_keys
    for key in pe_keys:  # the exact sinusoid vs the official fp32 computation: a few ulps
        assert (back[key] - original[key]).abs().max() < 2e-6, key


@needs("convert_personal")
def test_convert_single_file_to_diffusers_folder(jobs: Jobs) -> None:
    run = jobs["convert_personal"]
    assert_ok(run)
    assert run.saved() == ["folder"], run
    folder = run.cwd / "folder"
    for part in ("model_index.json", "unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (folder / part).exists(), part

    from animatediff import AnimationPipeline

    converted = AnimationPipeline.load(base=folder, motion_module=REF / "mm_v2.ckpt")
    direct = AnimationPipeline.load(
        base=REF / "base",
        personal=REF / "personal_ldm.safetensors",
        motion_module=REF / "mm_v2.ckpt",
    )
    for part in ("unet", "vae", "text_encoder"):  # the folder holds the personal model's weights
        a, b = getattr(converted, part).state_dict(), getattr(direct, part).state_dict()
        assert sorted(a) == sorted(b), part
        assert all(torch.equal(a[k], b[k]) for k in a), part
    prompt = "a boy playing guitar"
    assert converted.tokenizer(prompt).input_ids == direct.tokenizer(prompt).input_ids
