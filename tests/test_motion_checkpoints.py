"""Motion-module files: every loader variant, both layouts, version detection, insertion into and
removal from a 2D UNet, and the errors a bad file must give. Real files in tmp_path, made from
the official reference files."""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from diffusers import MotionAdapter, UNet2DConditionModel

from animatediff import AnimationPipeline, MotionModuleConfig, MotionModules, MotionUNet
from animatediff.checkpoints.adapters import apply_image_lora
from animatediff.checkpoints.base import load_base
from animatediff.checkpoints.io import CheckpointError, load_state_dict, save_state_dict
from animatediff.checkpoints.motion import (
    load_motion_module,
    read_motion_checkpoint,
    save_motion_module,
    to_diffusers_layout,
)
from animatediff.motion.module import sinusoidal_encoding

VERSIONS = ("v1", "v2", "v3")
DETECTED = {
    "v1": ("positional encoding length 24", True),
    "v2": ("mid-block module", False),
    "v3": ("positional encoding length 32", False),
}


def raw_sd(ref_dir: Path, version: str) -> dict[str, torch.Tensor]:
    """The released file as the official code reads it (pe buffers included)."""
    return torch.load(ref_dir / f"mm_{version}.ckpt", map_location="cpu", weights_only=True)


def without_pe(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in sd.items() if not k.endswith(".pe")}


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def from_diffusers_key(key: str) -> str:
    """diffusers MotionAdapter name -> released name (written out here, independently of src)."""
    key = re.sub(r"(\.motion_modules\.\d+)\.", r"\1.temporal_transformer.", key)
    for new, old in (
        (".norm1.", ".norms.0."),
        (".norm2.", ".norms.1."),
        (".norm3.", ".ff_norm."),
        (".attn1.", ".attention_blocks.0."),
        (".attn2.", ".attention_blocks.1."),
    ):
        key = key.replace(new, old)
    return key


def snapshot(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def hook_count(module: torch.nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="module")
def originals(ref_dir):
    """version -> MotionCheckpoint of the released file."""
    return {v: read_motion_checkpoint(ref_dir / f"mm_{v}.ckpt") for v in VERSIONS}


@pytest.fixture(scope="module")
def unet2d(ref_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(ref_dir / "base", subfolder="unet").eval()


# -------------------------------------------------------------------------- version detection


@pytest.mark.parametrize("version", VERSIONS)
def test_reference_files_detected(version, originals, ref_dir):
    ckpt = originals[version]
    source, across_frames = DETECTED[version]
    assert ckpt.config.version == version
    assert ckpt.version_source == source
    assert ckpt.config.groupnorm_across_frames is across_frames
    assert ckpt.config.mid_block is (version == "v2")
    assert ckpt.config.block_out_channels == (32, 64, 64, 64)
    assert ckpt.stored_pe_length == (24 if version == "v1" else 32)
    assert ckpt.layout == "original"
    assert not any(k.endswith(".pe") for k in ckpt.state_dict)
    assert len(ckpt.state_dict) == (546 if version == "v2" else 520)
    # the module holds exactly the file's weights
    raw = without_pe(raw_sd(ref_dir, version))
    module = load_motion_module(ckpt.path)
    assert_same_tensors(module.state_dict(), {k: v.float() for k, v in raw.items()})


def test_version_override(ref_dir, originals):
    ckpt = read_motion_checkpoint(ref_dir / "mm_v3.ckpt", version="v1")
    assert ckpt.config.version == "v1"
    assert ckpt.config.groupnorm_across_frames is True
    assert ckpt.version_source == "given"
    assert_same_tensors(ckpt.state_dict, originals["v3"].state_dict)
    module = load_motion_module(ref_dir / "mm_v3.ckpt", version="v1")
    assert module.config.version == "v1" and module.config.groupnorm_across_frames
    with pytest.raises(ValueError, match="v7"):
        read_motion_checkpoint(ref_dir / "mm_v3.ckpt", version="v7")


# ------------------------------------------------------------------------------ loader variants


def _variant(kind: str, sd: dict[str, torch.Tensor], folder: Path) -> Path:
    # names carry no version hint: detection must come from the content
    if kind == "safetensors":
        return save_state_dict(sd, folder / "repack.safetensors")
    if kind == "state_dict_wrapper":
        torch.save({"state_dict": sd, "global_step": 7}, folder / "wrapped.ckpt")
        return folder / "wrapped.ckpt"
    if kind == "module_prefix":
        torch.save({f"module.{k}": v for k, v in sd.items()}, folder / "prefixed.ckpt")
        return folder / "prefixed.ckpt"
    if kind == "no_pe":
        return save_state_dict(without_pe(sd), folder / "nope.safetensors")
    if kind == "fp16":
        return save_state_dict({k: v.half() for k, v in sd.items()}, folder / "half.safetensors")
    raise AssertionError(kind)


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize(
    "kind", ["safetensors", "state_dict_wrapper", "module_prefix", "no_pe", "fp16"]
)
def test_loader_variants_load_identically(kind, version, ref_dir, originals, tmp_path):
    path = _variant(kind, raw_sd(ref_dir, version), tmp_path)
    ckpt = read_motion_checkpoint(path)
    original = originals[version]
    want = original.state_dict
    if kind == "fp16":
        want = {k: v.half() for k, v in want.items()}
    assert_same_tensors(ckpt.state_dict, want)
    assert ckpt.config == original.config
    assert ckpt.config.version == version
    assert ckpt.config.groupnorm_across_frames is original.config.groupnorm_across_frames
    if kind == "no_pe":
        assert ckpt.stored_pe_length is None
        if version != "v2":  # v1/v3 share their keys: without pe it is a guess, and says so
            assert "guessed" in ckpt.version_source, ckpt.version_source
    else:
        assert ckpt.version_source == original.version_source
    # and the built module holds the same values as the one from the released file
    assert_same_tensors(
        load_motion_module(path).state_dict(),
        {k: v.float() for k, v in want.items()},
    )


def test_fp16_v1_without_pe_or_name_is_a_flagged_guess(ref_dir, tmp_path):
    """No pe, no name hint, fp16: v1 and v3 are indistinguishable; the guess is v3 and
    `version_source` says it is a guess; a name hint or `version=` settles it."""
    sd = {k: v.half() for k, v in without_pe(raw_sd(ref_dir, "v1")).items()}
    guessed = read_motion_checkpoint(save_state_dict(sd, tmp_path / "motion.safetensors"))
    assert guessed.config.version == "v3"
    assert "guessed" in guessed.version_source and "version=" in guessed.version_source
    named = read_motion_checkpoint(save_state_dict(sd, tmp_path / "mm_sd_v15.safetensors"))
    assert (named.config.version, named.version_source) == ("v1", "file name")
    assert named.config.groupnorm_across_frames is True
    given = read_motion_checkpoint(tmp_path / "motion.safetensors", version="v1")
    assert (given.config.version, given.version_source) == ("v1", "given")


# ------------------------------------------------------------------------------ diffusers layout


@pytest.mark.parametrize("version", VERSIONS)
def test_diffusers_folder_loads_in_diffusers_and_back(version, originals, tmp_path):
    original = originals[version]
    folder = save_motion_module(original, tmp_path / "adapter", layout="diffusers")
    assert (folder / "config.json").is_file()
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()

    ours = read_motion_checkpoint(folder)
    assert ours.layout == "diffusers"
    assert ours.config == original.config
    assert_same_tensors(ours.state_dict, original.state_dict)

    adapter, info = MotionAdapter.from_pretrained(folder, output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    assert info["mismatched_keys"] == []
    mapped = {
        from_diffusers_key(k): v for k, v in adapter.state_dict().items() if not k.endswith(".pe")
    }
    assert sorted(mapped) == sorted(original.state_dict)
    for k, v in original.state_dict.items():
        assert torch.equal(mapped[k], v.to(mapped[k].dtype)), k  # fp16 -> fp32 is exact
    # diffusers' own positional encoding buffers hold what we wrote: the exact sinusoid
    pe = {k: v for k, v in adapter.state_dict().items() if k.endswith(".pe")}
    assert len(pe) == len(original.state_dict) // 26  # 26 weights and one pe per module
    file_dtype = next(iter(original.state_dict.values())).dtype
    for k, v in pe.items():
        exact = sinusoidal_encoding(original.config.max_frames, v.shape[-1])
        assert torch.equal(v[0], exact.to(file_dtype).to(v.dtype)), k

    # a folder written by diffusers itself reads back to the same weights and version; without
    # a mid block, v1 and v3 look alike there, so a name must say which (or it is refused)
    adapter.save_pretrained(tmp_path / "by_diffusers")
    theirs = read_motion_checkpoint(
        tmp_path / "by_diffusers", _ambiguous(version, tmp_path / "by_diffusers")
    )
    assert theirs.config.version == version
    assert theirs.config.groupnorm_across_frames is original.config.groupnorm_across_frames
    for k, v in original.state_dict.items():
        assert torch.equal(theirs.state_dict[k], v.to(theirs.state_dict[k].dtype)), k


def _ambiguous(version: str, path) -> str | None:
    """The version to pass for a diffusers-layout file nothing names: v2 is told by its mid
    block, these v1 files by their 24-frame encoding; v3 (32 frames, no mid block) could be a
    v1 converted with diffusers' default length, so it is refused with a message asking."""
    if version != "v3":
        return None
    with pytest.raises(CheckpointError, match="motion-version"):
        read_motion_checkpoint(path)
    return version


@pytest.mark.parametrize("version", VERSIONS)
def test_diffusers_single_file(version, originals, tmp_path):
    original = originals[version]
    sd = to_diffusers_layout(original.state_dict, original.config)
    assert any(".attn1." in k for k in sd) and not any(".temporal_transformer." in k for k in sd)
    file = save_state_dict(sd, tmp_path / "adapter.safetensors")
    ckpt = read_motion_checkpoint(file, _ambiguous(version, file))
    assert ckpt.layout == "diffusers"
    assert ckpt.config == original.config
    assert_same_tensors(ckpt.state_dict, original.state_dict)


@pytest.mark.parametrize("version", VERSIONS)
def test_round_trip_original_diffusers_original(version, originals, tmp_path):
    original = originals[version]
    folder = save_motion_module(original, tmp_path / "diffusers", layout="diffusers")
    back = save_motion_module(read_motion_checkpoint(folder), tmp_path / "again.safetensors")
    again = read_motion_checkpoint(back)
    assert again.layout == "original"
    assert again.config == original.config
    assert_same_tensors(again.state_dict, original.state_dict)
    # and from a built module (fp32 values)
    module = load_motion_module(original.path)
    reloaded = load_motion_module(save_motion_module(module, tmp_path / "module.safetensors"))
    assert reloaded.config == module.config
    assert_same_tensors(reloaded.state_dict(), module.state_dict())


@pytest.mark.parametrize("version", VERSIONS)
def test_save_original_layout_as_ckpt(version, originals, tmp_path):
    """save_motion_module documents `.ckpt` as an original-layout target; what it writes must
    reload with the same weights and the same version."""
    original = originals[version]
    module = load_motion_module(original.path)
    path = save_motion_module(module, tmp_path / "motion.ckpt")
    reloaded = read_motion_checkpoint(path)
    assert reloaded.config.version == version
    assert reloaded.config.groupnorm_across_frames is original.config.groupnorm_across_frames
    assert_same_tensors(reloaded.state_dict, module.state_dict())


# ------------------------------------------------------------------------ insertion and removal


def test_insertion_and_removal_leave_the_2d_unet_untouched(ref_dir, unet2d, expected):
    g = torch.Generator().manual_seed(1)
    image = torch.randn(2, 4, 16, 16, generator=g)
    text = expected["unet.encoder_hidden_states"]
    before_sd = snapshot(unet2d)
    hooks_before = hook_count(unet2d)
    with torch.no_grad():
        before = unet2d(image, 500, text).sample

    # v1, with its across-frames GroupNorm: nothing is attached to the 2D UNet at all
    model = MotionUNet(unet2d, load_motion_module(ref_dir / "mm_v1.ckpt"))
    assert_same_tensors(snapshot(unet2d), before_sd)
    assert hook_count(unet2d) == hooks_before
    with torch.no_grad():
        video = model(torch.randn(1, 4, 4, 16, 16, generator=g), 500, text[:1])
        assert video.shape == (1, 4, 4, 16, 16)
        # while inserted, the 2D UNet called directly still computes the image model
        assert torch.equal(unet2d(image, 500, text).sample, before)

    assert model.remove() is unet2d
    assert hook_count(unet2d) == hooks_before
    assert_same_tensors(snapshot(unet2d), before_sd)
    with torch.no_grad():
        assert torch.equal(unet2d(image, 500, text).sample, before)


def test_gradients_reach_only_motion_parameters(ref_dir, unet2d, expected):
    motion = load_motion_module(ref_dir / "mm_v2.ckpt")
    unet2d.requires_grad_(False)
    model = MotionUNet(unet2d, motion)
    try:
        g = torch.Generator().manual_seed(2)
        out = model(
            torch.randn(1, 4, 4, 16, 16, generator=g),
            500,
            expected["unet.encoder_hidden_states"][:1],
        )
        out.square().mean().backward()
    finally:
        model.remove()
        unet2d.requires_grad_(True)
    assert all(p.grad is None for p in unet2d.parameters())
    grads = {n: p.grad for n, p in motion.named_parameters()}
    assert grads and all(g is not None for g in grads.values()), [
        n for n, g in grads.items() if g is None
    ]
    assert all(torch.isfinite(g).all() for g in grads.values())
    assert sum(g.abs().sum().item() for g in grads.values()) > 0


# ---------------------------------------------------------------------------------- bad files


def _broken(kind: str, sd: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], str]:
    """A damaged copy of the v2 state dict and the key its error must name."""
    sd = dict(sd)
    q = "down_blocks.1.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q.weight"
    if kind == "missing":
        del sd[q]
        return sd, q
    if kind == "extra":
        extra = "down_blocks.0.motion_modules.0.temporal_transformer.proj_extra.weight"
        sd[extra] = torch.zeros(3)
        return sd, extra
    if kind == "misshaped":
        key = "up_blocks.2.motion_modules.1.temporal_transformer.proj_in.weight"
        sd[key] = sd[key][:, :32].clone()
        return sd, key
    raise AssertionError(kind)


@pytest.mark.parametrize("kind", ["missing", "extra", "misshaped"])
def test_key_errors_name_file_and_keys(kind, ref_dir, tmp_path):
    sd, key = _broken(kind, raw_sd(ref_dir, "v2"))
    path = save_state_dict(sd, tmp_path / f"{kind}.safetensors")
    with pytest.raises(CheckpointError) as info:
        load_motion_module(path)
    message = str(info.value)
    assert str(path) in message
    assert key in message
    assert {"missing": "missing", "extra": "unexpected", "misshaped": "shape"}[kind] in message


@pytest.mark.parametrize("name", ["mm_v1.ckpt", "repack.safetensors"])
def test_truncated_file(name, ref_dir, tmp_path):
    if name.endswith(".ckpt"):
        data = (ref_dir / name).read_bytes()
    else:
        data = save_state_dict(raw_sd(ref_dir, "v1"), tmp_path / "full.safetensors").read_bytes()
    path = tmp_path / name
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(CheckpointError) as info:
        load_motion_module(path)
    assert str(path) in str(info.value)
    assert "truncated" in str(info.value) or "corrupt" in str(info.value)


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        # SDXL-like: three blocks with other channel counts (as the SDXL motion module)
        (dict(version="v2", block_out_channels=(32, 64, 128)), "block_out_channels"),
        # same channels, but three resnets per block
        (dict(version="v3", block_out_channels=(32, 64, 64, 64), layers_per_block=3), "resnets"),
    ],
)
def test_module_for_another_unet_does_not_fit(overrides, fragment, ref_dir, unet2d, tmp_path):
    version = overrides.pop("version")
    config = MotionModuleConfig.preset(version, **overrides)
    path = save_state_dict(MotionModules(config).state_dict(), tmp_path / "other_base.safetensors")
    module = load_motion_module(path)
    assert module.config.block_out_channels == config.block_out_channels
    before, hooks = snapshot(unet2d), hook_count(unet2d)
    with pytest.raises(ValueError, match="does not fit") as info:
        MotionUNet(unet2d, module)
    assert fragment in str(info.value)
    assert hook_count(unet2d) == hooks
    assert_same_tensors(snapshot(unet2d), before)
    with pytest.raises(ValueError, match="does not fit"):
        AnimationPipeline.load(base=ref_dir / "base", motion_module=path)


class _RunsCommand:
    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


@pytest.mark.parametrize("writer", ["pickle", "torch"])
def test_malicious_pickle_is_refused(writer, ref_dir, tmp_path):
    marker = tmp_path / "marker"
    payload = {"down_blocks.0.motion_modules.0.x": _RunsCommand(f"touch {marker}")}
    path = tmp_path / "motion.ckpt"
    if writer == "pickle":
        path.write_bytes(pickle.dumps(payload))
    else:
        torch.save(payload, path)
    for load in (
        lambda: load_motion_module(path),
        lambda: AnimationPipeline.load(base=ref_dir / "base", motion_module=path),
    ):
        with pytest.raises(CheckpointError) as info:
            load()
        assert str(path) in str(info.value)
        assert "refused" in str(info.value)
        assert not marker.exists()


def test_motion_lora_is_not_a_motion_module(ref_dir):
    path = ref_dir / "motion_lora_v2.ckpt"
    with pytest.raises(CheckpointError) as info:
        load_motion_module(path)
    assert str(path) in str(info.value) and "not a motion module" in str(info.value)


def test_truncated_personal_checkpoint(ref_dir, tmp_path):
    data = (ref_dir / "personal_ldm.safetensors").read_bytes()
    path = tmp_path / "personal.safetensors"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError) as info:
        AnimationPipeline.load(
            base=ref_dir / "base", motion_module=ref_dir / "mm_v1.ckpt", personal=path
        )
    assert str(path) in str(info.value)


@pytest.fixture(scope="module")
def image_model(ref_dir):
    return load_base(ref_dir / "base")


def _kohya_variant(ref_dir: Path, rename: str | None = None, misshape: str | None = None):
    sd = load_state_dict(ref_dir / "kohya_lora.safetensors")
    if rename:
        old, new = rename.split("->")
        sd = {k.replace(old, new) if k.startswith(old + ".") else k: v for k, v in sd.items()}
    if misshape:
        sd[misshape] = sd[misshape][:, :4].clone()
    return sd


@pytest.mark.parametrize(
    "change",
    [
        dict(
            rename="lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_v"
            "->lora_unet_up_blocks_1_attentions_7_transformer_blocks_0_attn2_to_v"
        ),
        # only a text-encoder layer is wrong: nothing may be merged into the UNet either
        dict(misshape="lora_te_text_model_encoder_layers_1_self_attn_v_proj.lora_down.weight"),
    ],
)
def test_bad_kohya_lora_leaves_model_unchanged(change, ref_dir, image_model, tmp_path):
    sd = _kohya_variant(ref_dir, **change)
    path = save_state_dict(sd, tmp_path / "bad_lora.safetensors")
    unet_before, text_before = snapshot(image_model.unet), snapshot(image_model.text_encoder)
    with pytest.raises(CheckpointError) as info:
        apply_image_lora(image_model, path, 0.8, "kohya")
    message = str(info.value)
    assert str(path) in message
    if "rename" in change:
        assert "lora_unet_up_blocks_1_attentions_7_transformer_blocks_0_attn2_to_v" in message
    else:
        assert "encoder.layers.1.self_attn.v_proj" in message
    assert_same_tensors(snapshot(image_model.unet), unet_before)
    assert_same_tensors(snapshot(image_model.text_encoder), text_before)
