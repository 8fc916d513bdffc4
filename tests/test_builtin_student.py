"""The built-in few-step student (issue 15): the built-in motion module distilled into a 4-step
module with the `distill` stage (docs/distill/), shipped in the package data as a named option
(not the default: it does not hold the teacher's metrics). Its name resolves to its file (and
its image-layer LoRA, as the adapter, when it has one), `animatediff models` lists it, and
`generate --motion-module NAME --preset auto` samples it with the LCM sampler at 4 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from clirun import assert_ok, assert_usage_error, cli, cli_environment

from animatediff import builtin
from animatediff.builtin.model import builtin_model
from animatediff.checkpoints.detect import describe
from animatediff.checkpoints.io import tensors_sha256

NAME = "builtin-4step"

pytestmark = pytest.mark.skipif(
    NAME not in builtin.manifest()["motion_modules"],
    reason="the built-in models are not installed in this tree",
)


@pytest.fixture(scope="module", autouse=True)
def environment(tmp_path_factory: pytest.TempPathFactory):
    with cli_environment(tmp_path_factory.mktemp("animatediff-cache")):
        yield


def test_the_name_resolves_to_the_student_and_its_lora():
    path, lora = builtin.motion_module(NAME)
    info = describe(path)
    assert (info["kind"], info["preset"], info["steps"]) == ("motion module", "animatelcm", 4)
    assert builtin.manifest()["motion_modules"][NAME]["steps"] == 4
    expected_adapter = None if lora is None else (str(lora), 1.0)
    assert builtin.named_motion_module(NAME) == (str(path), expected_adapter)
    # anything else passes through unchanged
    assert builtin.named_motion_module("v3") == ("v3", None)
    other = ("a.safetensors", 0.5)
    assert builtin.named_motion_module(None, other) == (None, other)
    assert builtin.named_motion_module(Path(NAME)) == (Path(NAME), None)
    with pytest.raises(ValueError, match=NAME):
        builtin.motion_module("nope")


def test_its_teacher_is_the_shipped_motion_module():
    """A student is only as current as its teacher: a rebuilt built-in model (world.build /
    pack) needs a student distilled again from the new motion module (docs/distill/)."""
    entry = builtin.manifest()["motion_modules"][NAME]
    teacher = builtin.PACKAGE_DATA / entry["teacher"]
    assert teacher == builtin_model().motion_module
    digest = tensors_sha256(teacher)
    assert digest == entry["teacher_tensors_sha256"], "the motion module changed: distil again"


@pytest.fixture
def with_lora(monkeypatch: pytest.MonkeyPatch) -> str:
    """A built-in entry that brings an image-layer LoRA (as `distill.lora_rank` makes one)."""
    shipped = builtin.manifest()
    entry = {"file": "motion_module.safetensors", "steps": 4, "adapter": "lora.safetensors"}
    names = {**shipped, "motion_modules": {**shipped["motion_modules"], "with-lora": entry}}
    monkeypatch.setattr(builtin, "manifest", lambda: names)
    return "with-lora"


def test_a_student_with_a_lora_brings_it_as_the_adapter(with_lora: str, tmp_path: Path):
    module, adapter = builtin.named_motion_module(with_lora)
    assert module == str(builtin.PACKAGE_DATA / "motion_module.safetensors")
    assert adapter == (str(builtin.PACKAGE_DATA / "lora.safetensors"), 1.0)
    with pytest.raises(ValueError, match="adapter"):
        builtin.named_motion_module(with_lora, ("other.safetensors", 1.0))
    refused = cli(tmp_path, "generate", "a cat", "--motion-module", with_lora, "--adapter", "x")
    assert_usage_error(refused, "--motion-module with-lora", "--adapter")


def test_models_lists_it(tmp_path: Path):
    run = cli(tmp_path, "models")
    assert_ok(run)
    line = next((x for x in run.stdout.splitlines() if f"--motion-module {NAME}" in x), None)
    assert line is not None, run
    assert "4-step" in line and "--preset auto" in line, line
    assert str(builtin.motion_module(NAME)[0]) in line


def test_generate_by_name_samples_with_lcm_at_4_steps(tmp_path: Path):
    run = cli(
        tmp_path, "generate", "a red circle moving right on a blue background",
        "--motion-module", NAME, "--preset", "auto", "--frames", "4", "--seed", "0",
        "-o", "fast.gif",
    )  # fmt: skip
    assert_ok(run)
    assert run.saved() == ["fast.gif"], run
    settings = json.loads((tmp_path / "fast.gif.json").read_text())
    s = settings["sampling"]
    assert (s["scheduler"], s["num_inference_steps"], s["guidance_scale"]) == ("lcm", 4, 2.0)
    path, lora = builtin.motion_module(NAME)
    assert Path(settings["models"]["motion_module"]) == path
    adapter = settings["models"]["adapter"]
    assert (adapter is None) if lora is None else (Path(adapter[0]) == lora), settings["models"]


def test_a_prompt_config_takes_the_preset_and_a_flag_still_wins(tmp_path: Path):
    """`preset: auto` in a config entry samples as the flag does; `--steps` beats the preset."""
    path = builtin.motion_module(NAME)[0]
    (tmp_path / "fast.yaml").write_text(
        f"Fast:\n  motion_module: [{path}]\n  preset: auto\n  prompt: [a red circle]\n"
        "  seed: [0]\n  L: 4\n"
    )
    for extra, steps in (((), 4), (("--steps", "2"), 2)):
        out = f"out{steps}"
        assert_ok(cli(tmp_path, "generate", "--config", "fast.yaml", *extra, "-o", out))
        (settings,) = (tmp_path / out).glob("000-*.gif.json")
        s = json.loads(settings.read_text())["sampling"]
        assert (s["scheduler"], s["num_inference_steps"], s["guidance_scale"]) == (
            "lcm",
            steps,
            2.0,
        )
