"""Model files that are ambiguous or malformed: said in one line, never guessed silently.

- A motion module in diffusers' layout is v1 or v3 with the same keys, and diffusers' converter
  stores 32 positions for both (the Hub's v1 adapter too): a name must say which, or
  `--motion-version`; otherwise v1 would run with v3's normalisation, without a word.
- Numbers in a stored configuration or a folder's config.json are checked against the weights.
- A MotionLoRA folder as diffusers' converter writes it loads like the file it came from.
- A `--base` that is a file, empty, broken or pickled with code is one clear line.
- LoRA deltas are computed once (checked from shapes, computed when merged).
"""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from cli_helpers import assert_error, assert_ok, run_cli, write_evil
from diffusers import MotionAdapter

from animatediff.checkpoints.adapters import apply_image_lora, attention_lora_pairs
from animatediff.checkpoints.base import load_base, save_base_folder
from animatediff.checkpoints.io import CheckpointError, load_state_dict
from animatediff.checkpoints.motion import (
    CONFIG_METADATA_KEY,
    _named_version,
    diffusers_adapter_config,
    load_motion_module,
    read_motion_checkpoint,
    save_motion_module,
    to_diffusers_layout,
)
from animatediff.checkpoints.sd_folder import check_base_folder
from animatediff.lora import LoRAPair

REF = Path(__file__).parent / "data" / "official_tiny"


@pytest.fixture(scope="module")
def originals() -> dict:
    return {v: read_motion_checkpoint(REF / f"mm_{v}.ckpt") for v in ("v1", "v2", "v3")}


def converted_by_diffusers(ckpt, folder: Path) -> Path:
    """As diffusers' `convert_animatediff_motion_module_to_diffusers.py` does: the weights
    without `pos_encoder`, into a MotionAdapter of 32 positions, saved by diffusers."""
    config = {k: v for k, v in diffusers_adapter_config(ckpt.config).items() if k[0] != "_"}
    adapter = MotionAdapter(**{**config, "motion_max_seq_length": 32})
    weights = to_diffusers_layout(ckpt.state_dict, ckpt.config)
    missing, unexpected = adapter.load_state_dict(
        {k: v.float() for k, v in weights.items() if not k.endswith(".pe")}, strict=False
    )
    assert not unexpected and all(k.endswith(".pe") for k in missing)
    adapter.save_pretrained(folder)
    return folder


# -- v1 or v3 in diffusers' layout -------------------------------------------------------------------
def test_diffusers_v1_is_not_taken_for_v3(originals, tmp_path: Path) -> None:
    folder = converted_by_diffusers(originals["v1"], tmp_path / "by_diffusers")
    with pytest.raises(CheckpointError, match=r"v1 or v3.*--motion-version v1 or v3"):
        read_motion_checkpoint(folder)
    given = read_motion_checkpoint(folder, "v1")
    assert given.config.version == "v1" and given.config.groupnorm_across_frames
    for key, value in originals["v1"].state_dict.items():
        assert torch.equal(given.state_dict[key], value.float()), key


@pytest.mark.parametrize(
    ("version", "where", "expected"),
    [
        ("v1", "animatediff-motion-adapter-v1-5", "v1"),
        ("v3", "animatediff-motion-adapter-v1-5-3", "v3"),
        ("v1", "hub/models--guoyww--animatediff-motion-adapter-v1-5/snapshots/0a1b2c", "v1"),
        ("v3", "hub/models--someone--mm-sd15-v3/snapshots/0a1b2c", "v3"),
    ],
)
def test_names_decide_in_diffusers_layout(originals, tmp_path, version, where, expected) -> None:
    folder = converted_by_diffusers(originals[version], tmp_path / where)
    ckpt = read_motion_checkpoint(folder)
    assert ckpt.config.version == expected
    assert ckpt.config.groupnorm_across_frames is (expected == "v1")
    assert ckpt.version_source.startswith("name")


@pytest.mark.parametrize(
    ("name", "version"),
    [
        ("mm_sd_v14.ckpt", "v1"),
        ("mm_sd_v15.ckpt", "v1"),
        ("mm_sd_v15_v2.ckpt", None),  # v2 is told by its mid block, not its name
        ("v3_sd15_mm.ckpt", "v3"),
        ("animatediff-motion-adapter-v1-5", "v1"),
        ("animatediff-motion-adapter-v1-5-2", None),
        ("animatediff-motion-adapter-v1-5-3", "v3"),
        ("temporaldiff-v1-animatediff", "v1"),
        ("animatelcm", None),
        ("mm_v12.safetensors", None),
    ],
)
def test_version_names(name: str, version: str | None) -> None:
    named = _named_version([name])
    assert (named[0] if named else None) == version


def test_cli_asks_for_the_version(originals, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    folder = converted_by_diffusers(originals["v1"], tmp_path / "adapter")
    args = ("generate", "a cat", "--base", REF / "base", "--motion-module", folder)
    small = ("--frames", "2", "--steps", "1", "--width", "64", "--height", "64")
    assert_error(run_cli(capsys, *args, *small, "-o", "x.gif"), "--motion-version")
    assert not (tmp_path / "x.gif").exists()
    assert_ok(run_cli(capsys, *args, *small, "--motion-version", "v1", "-o", "x.gif"))


def test_original_layout_still_detected(originals) -> None:
    assert [originals[v].config.version for v in ("v1", "v2", "v3")] == ["v1", "v2", "v3"]


# -- numbers that do not fit the weights -------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_attention_heads": 0}, "num_attention_heads 0"),
        ({"norm_num_groups": 0}, "norm_num_groups 0"),
        ({"norm_num_groups": 7}, "norm_num_groups 7"),
        ({"block_out_channels": [10**6, 10**6, 10**6, 10**6]}, "block_out_channels"),
        ({"max_frames": 10**9}, "max_frames"),
        ({"unknown": 1}, "unknown"),
    ],
)
def test_stored_config_checked(originals, tmp_path: Path, change: dict, message: str) -> None:
    path = save_motion_module(originals["v3"], tmp_path / "mm.safetensors")
    config = json.loads(safetensors.safe_open(path, "pt").metadata()[CONFIG_METADATA_KEY])
    tensors = safetensors.torch.load_file(path)
    metadata = {CONFIG_METADATA_KEY: json.dumps({**config, **change})}
    safetensors.torch.save_file(tensors, path, metadata=metadata)
    with pytest.raises(CheckpointError, match=re.escape(message)):
        load_motion_module(path)


def test_folder_config_heads_checked(originals, tmp_path: Path) -> None:
    folder = save_motion_module(originals["v2"], tmp_path / "adapter", layout="diffusers")
    weights = folder / "diffusion_pytorch_model.safetensors"
    safetensors.torch.save_file(safetensors.torch.load_file(weights), weights)  # no metadata
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "motion_num_attention_heads": 0}))
    with pytest.raises(CheckpointError, match="num_attention_heads 0"):
        read_motion_checkpoint(folder)


# -- MotionLoRA folders ------------------------------------------------------------------------------
def test_motion_lora_folder_as_diffusers_converts_it(originals, tmp_path: Path) -> None:
    """diffusers' `convert_animatediff_motion_lora_to_diffusers.py`: renamed keys under `unet.`,
    in FOLDER/diffusion_pytorch_model.safetensors."""
    original = load_state_dict(REF / "motion_lora_v2.ckpt")
    renames = (
        (".norms.0", ".norm1"), (".norms.1", ".norm2"), (".ff_norm", ".norm3"),
        (".attention_blocks.0", ".attn1"), (".attention_blocks.1", ".attn2"),
        (".temporal_transformer", ""),
    )  # fmt: skip
    converted = {}
    for key, value in original.items():
        for old, new in renames:
            key = key.replace(old, new)
        converted[f"unet.{key}"] = value
    folder = tmp_path / "motion-lora-zoom-in"
    folder.mkdir()
    safetensors.torch.save_file(converted, folder / "diffusion_pytorch_model.safetensors")
    module = load_motion_module(REF / "mm_v2.ckpt")
    from_folder = attention_lora_pairs(module, folder, "MotionLoRA")
    from_file = attention_lora_pairs(module, REF / "motion_lora_v2.ckpt", "MotionLoRA")
    assert sorted(from_folder) == sorted(from_file)
    for target, pair in from_file.items():
        assert torch.equal(from_folder[target].down, pair.down)
        assert torch.equal(from_folder[target].up, pair.up)
    with pytest.raises(CheckpointError, match="without a LoRA weights file"):
        attention_lora_pairs(module, tmp_path, "MotionLoRA")


# -- base folders ------------------------------------------------------------------------------------
def _base(tmp_path: Path, name: str) -> Path:
    return Path(shutil.copytree(REF / "base", tmp_path / name))


def test_base_mistakes(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="a file, not a folder.*--personal"):
        load_base(REF / "mm_v1.ckpt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no unet/, vae/, text_encoder/, tokenizer/"):
        load_base(tmp_path / "empty")
    broken = _base(tmp_path, "broken")
    (broken / "vae" / "config.json").write_text("[1, 2")
    with pytest.raises(CheckpointError, match=r"vae/config.json: not valid JSON"):
        load_base(broken)
    text = _base(tmp_path, "text")
    config = json.loads((text / "text_encoder" / "config.json").read_text())
    (text / "text_encoder" / "config.json").write_text(
        json.dumps({**config, "num_attention_heads": 5})
    )
    with pytest.raises(CheckpointError, match="hidden_size 32 is not a multiple"):
        load_base(text)
    no_vocab = _base(tmp_path, "no_vocab")
    (no_vocab / "tokenizer" / "vocab.json").unlink()
    with pytest.raises(CheckpointError, match=r"tokenizer: no vocab.json \(nor tokenizer.json\)"):
        load_base(no_vocab)


def test_folders_this_package_writes_pass(tmp_path: Path) -> None:
    """transformers 5 saves a tokenizer as tokenizer.json alone: that is a complete folder."""
    folder = save_base_folder(tmp_path / "written", load_base(REF / "base"))
    check_base_folder(folder)
    assert load_base(folder).unet.config.sample_size == 16


def test_base_with_code_in_its_weights(tmp_path: Path) -> None:
    evil = _base(tmp_path, "evil")
    (evil / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    write_evil(evil / "vae" / "diffusion_pytorch_model.bin", tmp_path / "pwned")
    with pytest.raises(
        CheckpointError, match="vae/diffusion_pytorch_model.bin: refused for safety"
    ):
        load_base(evil)
    assert not (tmp_path / "pwned").exists()


# -- LoRA deltas ---------------------------------------------------------------------------------------
def test_lora_deltas_computed_once(monkeypatch) -> None:
    image = load_base(REF / "base")
    calls: list[int] = []
    real = LoRAPair.delta

    def counted(self, shape):
        calls.append(id(self))
        return real(self, shape)

    monkeypatch.setattr(LoRAPair, "delta", counted)
    start = time.perf_counter()
    apply_image_lora(image, REF / "kohya_lora.safetensors", 0.8, "kohya")
    elapsed = time.perf_counter() - start
    assert calls and len(calls) == len(set(calls))  # each pair's product once
    assert elapsed < 1.0


def test_lora_rank_mismatch_is_a_clear_error() -> None:
    pair = LoRAPair(torch.zeros(4, 8), torch.zeros(8, 3))
    with pytest.raises(ValueError, match="differ in rank"):
        pair.check_fits(torch.Size([8, 8]))
    with pytest.raises(ValueError, match="does not fit"):
        LoRAPair(torch.zeros(4, 8), torch.zeros(6, 4)).check_fits(torch.Size([8, 8]))


def test_describe_tells_a_vae_from_clip_encoders(tmp_path):
    """A VAE has a decoder; CLIP encoders saved by transformers are named as such, not as VAEs."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from animatediff.checkpoints.detect import describe
    from animatediff.checkpoints.io import save_state_dict

    tiny = dict(hidden_size=8, intermediate_size=8, num_hidden_layers=1, num_attention_heads=2)
    vision = CLIPVisionModelWithProjection(CLIPVisionConfig(image_size=8, patch_size=4, **tiny))
    save_state_dict(vision.state_dict(), tmp_path / "model.safetensors")
    assert describe(tmp_path / "model.safetensors")["kind"] == "CLIP image encoder"
    vae = {"encoder.conv_in.weight": torch.zeros(1), "decoder.conv_in.weight": torch.zeros(1)}
    save_state_dict(vae, tmp_path / "vae.safetensors")
    assert describe(tmp_path / "vae.safetensors")["kind"] == "VAE"
