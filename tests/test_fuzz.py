"""Property-based fuzzing of `animatediff generate` (Hypothesis): random command lines built
from every flag the parser has, random prompt configs over the official keys and the option
names, random prompt maps and random settings files for `--from`. Whatever the input:

- the exit code is 0 or 2, never a traceback; a 2 comes with exactly one error line;
- nothing is written or changed in the working folder (the light half writes nothing; an
  existing output is never touched);
- no output name stays reserved.

The heavy half (model loading, sampling) is replaced by a stand-in that takes the checked
job, so a few hundred cases run in seconds; `test_cli_safety.py` holds the concrete cases of
the issue, including the ones that load models (malicious pickles for every file flag).
The train command's config schema is not covered here (its checks live in training/).
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

import pytest
import yaml
from cli_helpers import LIGHT_ONLY, accepted, listing, run_cli, write_evil
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from animatediff.cli import main as cli_main
from animatediff.cli.config import OFFICIAL_OPTIONS, OFFICIAL_OTHER
from animatediff.options import OWNER

REF = Path(__file__).parent / "data" / "official_tiny"
# ANIMATEDIFF_FUZZ_EXAMPLES=5000 explores further, with new random cases each run; by default
# the same 200 cases per test run every time, so that a failure reproduces.
EXAMPLES = int(os.environ.get("ANIMATEDIFF_FUZZ_EXAMPLES", "0"))
FUZZ = settings(
    max_examples=EXAMPLES or 200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    derandomize=not EXAMPLES,
)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Paths the fuzzer picks from: good model files, a malicious pickle, junk, folders."""
    root = tmp_path_factory.mktemp("fuzz-files")
    (root / "folder").mkdir()
    (root / "text.txt").write_text("not a model")
    (root / "bad.yaml").write_text("a: [unclosed\n")
    return {
        "evil": write_evil(root / "evil.ckpt", root / "pwned"),
        "folder": root / "folder",
        "text": root / "text.txt",
        "missing": root / "missing.safetensors",
        "bad yaml": root / "bad.yaml",
        "mm v1": REF / "mm_v1.ckpt",
        "lora": REF / "kohya_lora.safetensors",
        "base": REF / "base",
        "marker": root / "pwned",
    }


@pytest.fixture
def work(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    folder = tmp_path / "work"
    folder.mkdir()
    (folder / "existing.gif").write_bytes(b"GIF89a an earlier result")
    (folder / "a_file").write_text("x")
    monkeypatch.chdir(folder)
    monkeypatch.setenv("ANIMATEDIFF_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a random "owner/name" never reaches a network
    monkeypatch.setitem(cli_main.HEAVY, "generate", LIGHT_ONLY)
    return folder


def check(result, work: Path, before: dict, files: dict) -> None:
    assert result.code in (0, 2), result
    assert "Traceback" not in result.err, result
    errors = [m for m in result.messages if m.startswith("animatediff: error: ")]
    assert len(errors) == (1 if result.code == 2 else 0), result
    assert listing(work) == before, "the light half wrote or changed a file"
    assert not files["marker"].exists(), "code in a pickle ran"
    locks = work.parent / "cache" / "locks"
    assert not locks.exists() or not any(locks.iterdir()), "a reservation outlived its run"
    accepted.clear()


# -- values ---------------------------------------------------------------------------------------
NUMBERS = st.sampled_from(
    ["0", "-1", "1", "2", "7", "8", "16", "64", "4096", "4097", "1e308", "-1e308", "1e-3",
     "nan", "inf", "-inf", "NaN", "0.5", "1.5", "3.0", "100000000000", " 8", "8 ", "0x10", ""]
)  # fmt: skip
TEXT = st.one_of(
    st.text(max_size=12),
    st.sampled_from(["a cat", "", " ", "\udcff", "a:b", "a:0.5", "x.avi", "owner/name", "-"]),
)


def values(files: dict[str, Path]) -> st.SearchStrategy[str]:
    paths = st.sampled_from([str(p) for k, p in files.items() if k != "marker"])
    with_strength = st.tuples(paths, NUMBERS).map(lambda t: f"{t[0]}:{t[1]}")
    return st.one_of(
        NUMBERS,
        st.integers(-(10**12), 10**12).map(str),
        st.floats().map(repr),
        TEXT,
        paths,
        with_strength,
    )


def generate_flags() -> list[argparse.Action]:
    parser = cli_main.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    skip = {"help", "debug", "verbose", "quiet", "prompt"}
    return [a for a in sub.choices["generate"]._actions if a.dest not in skip]


FLAGS = generate_flags()


@st.composite
def command_lines(draw, files: dict[str, Path]) -> list[str]:
    argv = ["generate"]
    prompt = draw(st.one_of(st.none(), TEXT))
    if prompt is not None:
        argv.append(prompt)
    for action in draw(st.lists(st.sampled_from(FLAGS), max_size=5, unique_by=id)):
        flag = draw(st.sampled_from(action.option_strings))
        if action.nargs == 0:
            argv.append(flag)
            continue
        count = draw(st.integers(1, 3)) if action.nargs in ("+", "*") else 1
        argv += [flag, *(draw(values(files)) for _ in range(count))]
    if draw(st.booleans()):
        out = draw(st.sampled_from(["x.gif", "x.avi", "out", "existing.gif", "a_file/x.gif",
                                    "x.MP4", "sub/x.webp", "."]))  # fmt: skip
        argv += ["-o", out]
    return argv


@FUZZ
@given(data=st.data())
def test_any_command_line(data, work: Path, files: dict[str, Path], capsys) -> None:
    argv = data.draw(command_lines(files))
    before = listing(work)
    check(run_cli(capsys, *argv), work, before, files)


# -- prompt configs --------------------------------------------------------------------------------
def leaf(files: dict[str, Path]) -> st.SearchStrategy:
    return st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(10**6), 10**6),
        st.floats(),
        st.text(max_size=8),
        st.sampled_from([str(p) for k, p in files.items() if k != "marker"]),
    )


def any_value(files: dict[str, Path]) -> st.SearchStrategy:
    return st.recursive(
        leaf(files),
        lambda inner: st.one_of(
            st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)
        ),
        max_leaves=6,
    )


CONFIG_KEYS = sorted(set(OFFICIAL_OPTIONS) | OFFICIAL_OTHER | set(OWNER)) + ["unknown_key"]


@st.composite
def entries(draw, files: dict[str, Path]) -> dict:
    entry = {"motion_module": str(REF / "mm_v1.ckpt"), "prompt": ["a cat"], "L": 4, "W": 64}
    for key in draw(st.lists(st.sampled_from(CONFIG_KEYS), max_size=4, unique=True)):
        if draw(st.integers(0, 9)) == 0:
            entry.pop(key, None)
        else:
            entry[key] = draw(any_value(files))
    return entry


@FUZZ
@given(data=st.data())
def test_any_prompt_config(data, work: Path, files: dict[str, Path], capsys) -> None:
    config = data.draw(st.lists(entries(files), min_size=1, max_size=2))
    if data.draw(st.booleans()):
        config = {f"entry{i}": e for i, e in enumerate(config)}
    path = work.parent / "config.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    before = listing(work)
    result = run_cli(capsys, "generate", "--config", path, "-o", "batch", "--base", REF / "base")
    check(result, work, before, files)


@FUZZ
@given(data=st.data())
def test_any_prompt_map(data, work: Path, files: dict[str, Path], capsys) -> None:
    keys = st.one_of(st.integers(-20, 40), st.text(max_size=4), st.booleans(), st.floats())
    prompt_map = data.draw(st.dictionaries(keys, any_value(files), max_size=4))
    path = work.parent / "map.yaml"
    path.write_text(yaml.safe_dump(prompt_map, allow_unicode=True))
    frames = data.draw(st.sampled_from([[], ["--frames", "4"], ["--frames", "40"]]))
    before = listing(work)
    check(run_cli(capsys, "generate", "--prompt-map", path, *frames), work, before, files)


# -- settings files for --from ---------------------------------------------------------------------
SETTINGS = {
    "prompt": "a red circle",
    "negative_prompt": "",
    "sampling": {"num_frames": 4, "height": 64, "width": 64, "num_inference_steps": 2, "seed": 1},
    "context": {"context_length": 16},
    "noise": {"freeinit_iterations": 0},
    "prompting": {"prompt_head": ""},
    "control": {},
    "init": {},
    "output": {"fps": 8.0},
    "models": {"base": None, "loras": []},
}


@st.composite
def mutated_settings(draw, files: dict[str, Path]) -> dict:
    data = json.loads(json.dumps(SETTINGS))
    for _ in range(draw(st.integers(1, 3))):
        group = draw(st.sampled_from(sorted(data)))
        if isinstance(data[group], dict) and draw(st.booleans()):
            key = draw(st.sampled_from(sorted(data[group]) + sorted(OWNER)))
            data[group][key] = draw(any_value(files))
        else:
            data[group] = draw(any_value(files))
    return data


@FUZZ
@given(data=st.data())
def test_any_settings_file(data, work: Path, files: dict[str, Path], capsys) -> None:
    settings_data = data.draw(mutated_settings(files))
    path = work.parent / "settings.json"
    text = json.dumps(settings_data, allow_nan=True)
    path.write_text(text)
    before = listing(work)
    result = run_cli(capsys, "generate", "--from", path)
    check(result, work, before, files)
    finite = "NaN" not in text and "Infinity" not in text
    if result.code == 0:
        assert finite, "a non-finite number was accepted"


def test_the_unchanged_settings_file_is_accepted(work: Path, files, capsys) -> None:
    """The fuzzer's starting point is valid, so its mutations test the checks, not a typo."""
    path = work.parent / "settings.json"
    path.write_text(json.dumps(SETTINGS))
    result = run_cli(capsys, "generate", "--from", path)
    assert result.code == 0, result
    (job,) = accepted
    assert job.runs[0].options().sampling.num_frames == 4
    assert not math.isnan(job.runs[0].options().output.fps)
    accepted.clear()
