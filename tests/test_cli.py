"""End-to-end tests of the `animatediff` command line, no mocks.

The CLI runs in-process through `main(argv)` (exit code returned, stdout and stderr captured,
the working folder switched to a temporary one), so the imports of torch and diffusers are paid
once per session rather than once per command. A few tests at the end start real processes: the
installed `animatediff` entry point and `python -m animatediff.cli.main`, whose exit codes and
tracebacks only a process shows.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import av
import pytest
import safetensors.torch
import torch
from clirun import Run, assert_ok, assert_usage_error, cli, cli_environment

from animatediff import builtin
from animatediff.builtin.model import builtin_model
from animatediff.video import read_video, video_info

REF = Path(__file__).parent / "data" / "official_tiny"
PROMPT = "a red circle moving on a blue background"
FAST = ("--steps", "2", "--frames", "8")
# The reference base at 128x128 (16x16 latents): a custom base needs an explicit motion module.
TINY_BASE = ("--base", str(REF / "base"), "--width", "128", "--height", "128")
NEGATIVE = "worst quality, low quality"
PROCESS_TIMEOUT = 600  # seconds; generous, as other test runs may share the CPU


def settings_of(path: Path) -> dict:
    return json.loads(path.with_name(path.name + ".json").read_text())


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory: pytest.TempPathFactory):
    with cli_environment(tmp_path_factory.mktemp("animatediff-cache")):
        yield


# -- generate with the built-in model ------------------------------------------------------------
@pytest.fixture(scope="module")
def builtin_gif(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Built-in model: generate, the same command again (refused), then with --overwrite."""
    cwd = tmp_path_factory.mktemp("builtin_gif")
    args = ("generate", PROMPT, *FAST, "-o", "out.gif", "--seed", "3")
    result: dict = {"first": cli(cwd, *args)}
    if result["first"].returncode != 0:
        return result
    first = cwd / "first"
    first.mkdir()
    for name in ("out.gif", "out.gif.json"):
        shutil.copyfile(cwd / name, first / name)
    result["again"] = cli(cwd, *args)
    result["untouched"] = (cwd / "out.gif").read_bytes() == (first / "out.gif").read_bytes()
    result["overwrite"] = cli(cwd, *args, "--overwrite")
    return result


def test_generate_builtin_gif(builtin_gif) -> None:
    run = builtin_gif["first"]
    assert_ok(run)
    assert "saved out.gif" in run.stdout.splitlines(), run
    first = run.cwd / "first"
    info = video_info(first / "out.gif")
    assert (info.num_frames, info.width, info.height) == (8, 64, 64)
    assert info.fps == pytest.approx(8, rel=0.05)  # GIF stores 1/100 s: 125 ms -> 120 ms
    frames = read_video(first / "out.gif")
    assert frames.shape == (3, 8, 64, 64)
    assert frames.std() > 0.01  # not a blank picture
    assert (frames[:, 0] - frames[:, -1]).abs().max() > 0.1  # it moves (more: test_default_output)
    settings = settings_of(first / "out.gif")
    assert settings["sampling"]["seed"] == 3 and settings["seeds"] == [3]
    assert settings["prompt"] == PROMPT
    sampling = settings["sampling"]
    assert (sampling["num_frames"], sampling["num_inference_steps"]) == (8, 2)
    assert (sampling["width"], sampling["height"]) == (64, 64)  # the model's native size
    assert settings["outputs"] == ["out.gif"]


def test_existing_output_needs_overwrite(builtin_gif) -> None:
    assert_ok(builtin_gif["first"])
    message = assert_usage_error(builtin_gif["again"], "out.gif", "--overwrite")
    assert "already exists" in message
    assert builtin_gif["untouched"], "the refused run changed out.gif"
    assert_ok(builtin_gif["overwrite"])
    assert "saved out.gif" in builtin_gif["overwrite"].stdout.splitlines(), builtin_gif["overwrite"]


def test_same_seed_same_frames(builtin_gif) -> None:
    run = builtin_gif["overwrite"]
    assert_ok(run)
    assert torch.equal(read_video(run.cwd / "first" / "out.gif"), read_video(run.cwd / "out.gif"))
    assert settings_of(run.cwd / "out.gif")["sampling"]["seed"] == 3


def test_builtin_styles_and_motion_loras_by_name(tmp_path) -> None:
    """`animatediff models` lists the shipped extras, and generate takes them by name."""
    if not builtin.manifest()["personal"]:
        pytest.skip("the built-in models are not installed in this tree")
    listing = cli(tmp_path, "models")
    assert_ok(listing)
    names = builtin.manifest()
    for name in [*names["personal"], *names["motion_loras"]]:
        assert name in listing.stdout, listing
    for line in ("--motion-module v3 ", "--motion-lora v2-zoom-in ", "--base sd15 "):
        assert line in listing.stdout, listing  # the Hub names, with the flag that takes them
    run = cli(
        tmp_path, "generate", "a red circle on a blue background",
        "--personal", "stripes", "--motion-lora", "zoom-in:0.8", "--frames", "4", "--steps", "2",
        "--seed", "0", "-o", "styled.gif",
    )  # fmt: skip
    assert_ok(run)
    settings = settings_of(tmp_path / "styled.gif")
    assert settings["models"]["personal"].endswith("stripes.safetensors")
    assert settings["motion_loras"] == {"zoom-in": 0.8}
    assert_usage_error(cli(tmp_path, "generate", "a cat", "--personal", "nope"), "nope")


# -- generate with the reference models ----------------------------------------------------------
def test_generate_mp4_with_motion_lora(tmp_path) -> None:
    run = cli(
        tmp_path, "generate", "a boy playing guitar", *FAST, *TINY_BASE,
        "--motion-module", REF / "mm_v2.ckpt",
        "--motion-lora", f"{REF / 'motion_lora_v2.ckpt'}:0.7",
        "--seed", "5", "-o", "out.mp4",
    )  # fmt: skip
    assert_ok(run)
    assert run.saved() == ["out.mp4"], run
    out = tmp_path / "out.mp4"
    with av.open(str(out)) as container:
        assert container.streams.video[0].codec_context.name == "h264"
    info = video_info(out)
    assert (info.num_frames, info.width, info.height) == (8, 128, 128)
    assert read_video(out).shape == (3, 8, 128, 128)
    settings = settings_of(out)
    assert settings["sampling"]["seed"] == 5
    assert settings["motion_loras"] == {"motion_lora_v2": 0.7}
    assert Path(settings["models"]["motion_module"]).name == "mm_v2.ckpt"


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


def _config_outputs(run: Run, count: int) -> list[tuple[Path, dict]]:
    assert_ok(run)
    videos = sorted(v for v in (run.cwd / "out").glob("*.gif") if v.name != "sample.gif")
    assert len(videos) == count, run
    assert (run.cwd / "out" / "sample.gif").is_file()  # the grid, as the official script writes
    assert (run.cwd / "out" / "config.yaml").is_file()  # and a copy of the config
    saved = sorted(p for p in run.saved() if Path(p).name != "sample.gif")
    assert saved == [str(Path("out") / v.name) for v in videos], run
    return [(v, settings_of(v)) for v in videos]


def test_config_v2_mapping_form(tmp_path) -> None:
    for sub, name in (
        ("Motion_Module", "mm_v2.ckpt"),
        ("MotionLoRA", "motion_lora_v2.ckpt"),
        ("DreamBooth_LoRA", "personal_ldm.safetensors"),
    ):
        (tmp_path / "models" / sub).mkdir(parents=True)
        shutil.copyfile(REF / name, tmp_path / "models" / sub / name)
    (tmp_path / "tiny-v2.yaml").write_text(V2_CONFIG)
    run = cli(tmp_path, "generate", "--config", "tiny-v2.yaml", "--base", REF / "base", "-o", "out")
    outputs = _config_outputs(run, 2)
    prompts = ["a boy playing guitar, best quality", PROMPT]
    for (video, settings), prompt, seed in zip(outputs, prompts, [1, 2], strict=True):
        info = video_info(video)
        assert (info.num_frames, info.width, info.height) == (8, 128, 64), video  # L, W, H
        assert settings["prompt"] == prompt
        assert settings["negative_prompt"] == NEGATIVE  # one n_prompt serves every prompt
        sampling = settings["sampling"]
        assert sampling["seed"] == seed
        assert (sampling["num_inference_steps"], sampling["guidance_scale"]) == (2, 7.5)
        assert settings["motion_loras"] == {"motion_lora_v2": 0.7}
        models = settings["models"]
        assert Path(models["personal"]).name == "personal_ldm.safetensors"
        assert Path(models["motion_module"]).name == "mm_v2.ckpt"
        assert models["loras"] == []  # lora_model_path: ""


def test_config_v3_list_form_with_adapter(tmp_path) -> None:
    (tmp_path / "tiny-v3.yaml").write_text(V3_CONFIG)
    run = cli(tmp_path, "generate", "--config", "tiny-v3.yaml", "--base", REF / "base", "-o", "out")
    ((video, settings),) = _config_outputs(run, 1)
    info = video_info(video)
    assert (info.num_frames, info.width, info.height) == (6, 64, 128)  # L, W, H
    assert settings["prompt"] == "a boy playing guitar"
    assert settings["negative_prompt"] == NEGATIVE
    sampling = settings["sampling"]
    assert sampling["seed"] == 7
    assert (sampling["num_inference_steps"], sampling["guidance_scale"]) == (2, 8.5)
    models = settings["models"]
    assert models["adapter"] == [str(REF / "domain_adapter_v3.ckpt"), 1.0]
    assert Path(models["motion_module"]).name == "mm_v3.ckpt"
    assert models["personal"] is None  # dreambooth_path: ""


# -- user mistakes -------------------------------------------------------------------------------
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


@pytest.mark.parametrize("name", list(USAGE_ERRORS))
def test_usage_error(tmp_path, name: str) -> None:
    args, needles = USAGE_ERRORS[name]
    # The LoRA exists, so only the strength syntax can be at fault.
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "x.safetensors")
    assert_usage_error(cli(tmp_path, *args), *needles)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.safetensors"]  # nothing written


def test_truncated_motion_module(tmp_path) -> None:
    data = (REF / "mm_v2.ckpt").read_bytes()
    (tmp_path / "mm_cut.ckpt").write_bytes(data[: len(data) // 2])  # an interrupted download
    run = cli(tmp_path, "generate", PROMPT, *FAST, *TINY_BASE, "--motion-module", "mm_cut.ckpt")
    message = assert_usage_error(run, "mm_cut.ckpt")
    assert re.search(r"truncated|corrupt", message), message


class Evil:
    """Unpickling this runs `touch PWNED` -- unless the loader refuses it."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def test_malicious_pickle_is_refused(tmp_path) -> None:
    # As an attacker would ship it: a torch.save() archive that looks like a motion module.
    key = "down_blocks.0.motion_modules.0.temporal_transformer.norm.weight"
    torch.save({key: torch.ones(32), "payload": Evil()}, tmp_path / "evil.ckpt")
    run = cli(tmp_path, "generate", PROMPT, *FAST, *TINY_BASE, "--motion-module", "evil.ckpt")
    assert_usage_error(run, "evil.ckpt", "refused for safety")
    assert not (tmp_path / "PWNED").exists(), "the pickle's payload ran"
    assert (tmp_path / "evil.ckpt").exists()  # sanity: the file was really there


def test_malformed_config_is_a_usage_error(tmp_path) -> None:
    (tmp_path / "broken.yaml").write_text(
        'Entry:\n  prompt: ["unclosed\n  motion_module: mm.ckpt\n'
    )
    run = cli(tmp_path, "generate", "--config", "broken.yaml", "-o", "out")
    assert_usage_error(run, "broken.yaml")


# -- inspect -------------------------------------------------------------------------------------
def test_inspect_motion_modules(tmp_path) -> None:
    text = cli(tmp_path, "inspect", REF / "mm_v1.ckpt")
    assert_ok(text)
    assert re.search(r"^kind\s+motion module$", text.stdout, re.M), text
    assert re.search(r"^version\s+v1$", text.stdout, re.M), text
    for name, key, value in (("mm_v2.ckpt", "version", "v2"), ("mm_v3.ckpt", "dtype", "fp16")):
        run = cli(tmp_path, "inspect", REF / name, "--json")
        assert_ok(run)
        info = json.loads(run.stdout)
        assert info["kind"] == "motion module", run
        assert info[key] == value, run
    v3 = cli(tmp_path, "inspect", REF / "mm_v3.ckpt", "--json")
    assert json.loads(v3.stdout)["version"] == "v3", v3


def test_inspect_loras(tmp_path) -> None:
    motion_lora = cli(tmp_path, "inspect", REF / "motion_lora_v2.ckpt")
    assert_ok(motion_lora)
    assert re.search(r"^kind\s+MotionLoRA$", motion_lora.stdout, re.M), motion_lora
    kohya = cli(tmp_path, "inspect", REF / "kohya_lora.safetensors")
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


@pytest.fixture(scope="module")
def convert_motion(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Original .ckpt -> diffusers folder -> original .safetensors (and .ckpt)."""
    cwd = tmp_path_factory.mktemp("convert_motion")
    result = {"to_diffusers": cli(cwd, "convert", REF / "mm_v2.ckpt", "out_diffusers")}
    if result["to_diffusers"].returncode == 0:
        result["back"] = cli(cwd, "convert", "out_diffusers", "back.safetensors")
        result["back_ckpt"] = cli(cwd, "convert", "out_diffusers", "back.ckpt")
    return result


def test_convert_motion_module_round_trip(convert_motion) -> None:
    to_diffusers = convert_motion["to_diffusers"]
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

    back = convert_motion["back"]
    assert_ok(back)
    assert back.saved() == ["back.safetensors"], back
    _bitwise_equal(
        safetensors.torch.load_file(back.cwd / "back.safetensors"), _original_without_pe()
    )


def test_convert_motion_module_to_ckpt(convert_motion) -> None:
    run = convert_motion["back_ckpt"]
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


def test_convert_single_file_to_diffusers_folder(tmp_path) -> None:
    run = cli(
        tmp_path, "convert", REF / "personal_ldm.safetensors", "folder", "--base", REF / "base"
    )
    assert_ok(run)
    assert run.saved() == ["folder"], run
    folder = tmp_path / "folder"
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


# -- real processes ------------------------------------------------------------------------------
def process(cwd: Path, *command: object) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.run(
        [str(c) for c in command],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=PROCESS_TIMEOUT,
    )


def test_entry_point_runs(tmp_path) -> None:
    """The installed `animatediff` command: its version, and a usage mistake's exit code 2."""
    exe = shutil.which("animatediff")
    if exe is None:
        pytest.skip("the package is not installed (no `animatediff` on PATH)")
    version = process(tmp_path, exe, "--version")
    assert version.returncode == 0, version
    assert re.fullmatch(r"animatediff \d+\.\d+\.\S+\n", version.stdout), version
    mistake = process(tmp_path, exe, "generate", PROMPT, "--width", "100")
    assert mistake.returncode == 2, mistake
    assert mistake.stderr.startswith("animatediff: error: --width 100"), mistake
    assert len(mistake.stderr.strip().splitlines()) == 1, mistake


def test_debug_shows_traceback(tmp_path) -> None:
    """`--debug`: the traceback is printed, and a mistake still exits 2."""
    proc = process(
        tmp_path, sys.executable, "-m", "animatediff.cli.main",
        "--debug", "generate", PROMPT, *FAST, "--motion-module", "missing.ckpt",
    )  # fmt: skip
    assert proc.returncode == 2, proc
    assert "Traceback (most recent call last)" in proc.stderr, proc
    assert "missing.ckpt" in proc.stderr, proc


@pytest.mark.slow  # a process that imports torch and diffusers: 5-15 s
def test_late_mistake_is_one_line_in_a_process(tmp_path) -> None:
    """A file found bad only once it loads (a motion module cut short after its header, which
    the first checks read): one line, exit 2 -- no progress bars or warnings before it."""
    data = builtin_model().motion_module.read_bytes()
    (tmp_path / "mm_cut.safetensors").write_bytes(data[: len(data) // 2])
    proc = process(
        tmp_path, sys.executable, "-m", "animatediff.cli.main",
        "generate", PROMPT, *FAST, "--motion-module", "mm_cut.safetensors",
    )  # fmt: skip
    assert proc.returncode == 2, proc
    assert proc.stderr.startswith("animatediff: error: mm_cut.safetensors"), proc
    assert len(proc.stderr.strip().splitlines()) == 1, proc
    assert not proc.stdout, proc


@pytest.mark.slow
def test_module_generates_in_a_process(tmp_path) -> None:
    """`python -m animatediff.cli.main generate` on the built-in model, start to finish; the
    same command in-process gives the same frames."""
    args = ("generate", PROMPT, "--steps", "2", "--frames", "4", "--seed", "9", "-o", "p.gif")
    proc = process(tmp_path, sys.executable, "-m", "animatediff.cli.main", *args)
    assert proc.returncode == 0, proc
    assert proc.stdout.splitlines() == ["saved p.gif", "settings p.gif.json"], proc
    assert "Traceback" not in proc.stderr, proc
    in_process = cli(tmp_path, *args[:-1], "q.gif")
    assert_ok(in_process)
    assert torch.equal(read_video(tmp_path / "p.gif"), read_video(tmp_path / "q.gif"))
