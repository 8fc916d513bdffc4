"""Exporters: single-file LDM checkpoints and kohya LoRAs, proven by reading them back with the
project's own loaders (`load_single_file`, `apply_image_lora`, `parse_kohya_lora`) and against
the reference LDM file written by the official tooling."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModelWithProjection

from animatediff.checkpoints.adapters import apply_image_lora
from animatediff.checkpoints.base import ImageModel, load_base, load_single_file
from animatediff.checkpoints.export import (
    kohya_from_official,
    ldm_state_dict,
    save_kohya_lora,
    save_single_file,
)
from animatediff.checkpoints.io import read_metadata, save_state_dict
from animatediff.checkpoints.lora import parse_kohya_lora, to_official_layout
from animatediff.lora import LoRAPair, merge_lora

REF = Path(__file__).parent / "data" / "official_tiny"
PARTS = ("unet", "vae", "text_encoder")


def weights(model: ImageModel, part: str) -> dict[str, torch.Tensor]:
    return {k: v for k, v in getattr(model, part).state_dict().items() if "position_ids" not in k}


def perturb(model: ImageModel, seed: int) -> None:
    """Fresh random weights, so a round trip cannot pass by leaving the base's in place."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for part in PARTS:
            for p in getattr(model, part).parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def small_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second layout: 3 levels, one resnet per level, no attention at the top level."""
    folder = tmp_path_factory.mktemp("small") / "base"
    torch.manual_seed(0)
    UNet2DConditionModel(
        sample_size=16,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    ).save_pretrained(folder / "unet")
    AutoencoderKL(
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        latent_channels=4,
        sample_size=64,
    ).save_pretrained(folder / "vae")
    for part in ("tokenizer", "text_encoder"):
        shutil.copytree(REF / "base" / part, folder / part)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return folder


# ----------------------------------------------------------------------------- single file


def test_reference_ldm_file_is_reproduced_bit_exactly(tmp_path: Path) -> None:
    """load(official file) -> export: same keys, dtypes and bytes as the official file."""
    model = load_base(REF / "base")
    load_single_file(model, REF / "personal_ldm.safetensors")
    out = save_single_file(model.unet, model.vae, model.text_encoder, tmp_path / "m.safetensors")
    ours = safetensors.torch.load_file(out)
    ref = safetensors.torch.load_file(REF / "personal_ldm.safetensors")
    assert sorted(ours) == sorted(ref)
    for key, value in ref.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key


@pytest.mark.parametrize("which", ["reference", "small"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_round_trip_through_load_single_file(
    tmp_path: Path, small_base: Path, which: str, dtype: torch.dtype
) -> None:
    base = REF / "base" if which == "reference" else small_base
    source = load_base(base)
    perturb(source, seed=1)
    parts = (source.unet, source.vae, source.text_encoder)
    path = save_single_file(
        *parts, tmp_path / "m.safetensors", dtype=dtype, metadata={"note": "test"}
    )
    assert read_metadata(path) == {"note": "test"}
    target = load_base(base)
    assert load_single_file(target, path) == list(PARTS)
    for part in PARTS:
        want, got = weights(source, part), weights(target, part)
        assert sorted(got) == sorted(want), part
        for key, value in want.items():
            assert torch.equal(got[key], value.to(dtype).float()), f"{part}: {key}"


@pytest.mark.parametrize(
    "which, keys",
    [
        # 2 resnets per level: downsamplers at input_blocks 3/6/9, UpBlock2D's upsampler at .1,
        # CrossAttnUpBlock2D's at .2 (after the attention).
        ("reference", ["input_blocks.3.0.op", "input_blocks.11.0.in_layers.2", "middle_block.1.proj_in",
                       "output_blocks.2.1.conv", "output_blocks.5.2.conv", "output_blocks.11.1.norm"]),
        # 1 resnet per level, no attention at level 0, last up level has no upsampler.
        ("small", ["input_blocks.3.0.skip_connection", "input_blocks.2.0.op", "input_blocks.3.1.norm",
                   "output_blocks.1.2.conv", "output_blocks.3.2.conv", "output_blocks.5.0.emb_layers.1"]),
    ],
)  # fmt: skip
def test_ldm_unet_names(small_base: Path, which: str, keys: list[str]) -> None:
    model = load_base(REF / "base" if which == "reference" else small_base)
    sd = ldm_state_dict(model.unet, model.vae, model.text_encoder)
    for key in keys:
        assert f"model.diffusion_model.{key}.weight" in sd, key
    # Attention at level 0 in the reference only (its down types start with CrossAttn).
    has_attention = any(k.startswith("model.diffusion_model.input_blocks.1.1.") for k in sd)
    assert has_attention == (which == "reference")
    n = len(model.vae.config.up_block_types)
    assert sd["first_stage_model.decoder.mid.attn_1.q.weight"].ndim == 4
    assert f"first_stage_model.decoder.up.{n - 1}.upsample.conv.weight" in sd
    assert "first_stage_model.decoder.up.0.upsample.conv.weight" not in sd  # last level in LDM
    assert "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight" in sd


def _tiny_unet(**kw) -> UNet2DConditionModel:
    args = dict(
        sample_size=8,
        block_out_channels=(32, 32),
        layers_per_block=1,
        cross_attention_dim=32,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    )
    return UNet2DConditionModel(**{**args, **kw})


@pytest.mark.parametrize(
    "kw, message",
    [
        (dict(down_block_types=("AttnDownBlock2D", "DownBlock2D")), "down block type AttnDownBlock2D"),
        (dict(up_block_types=("UpBlock2D", "AttnUpBlock2D")), "up block type AttnUpBlock2D"),
        (dict(mid_block_type="UNetMidBlock2D"), "mid block type UNetMidBlock2D"),
        (dict(layers_per_block=(1, 2)), "layers_per_block"),
        (dict(class_embed_type="timestep"), "no SD1.5 LDM equivalent: class_embedding"),
    ],
)  # fmt: skip
def test_unsupported_unet_is_refused_clearly(tmp_path: Path, kw: dict, message: str) -> None:
    model = load_base(REF / "base")
    with pytest.raises(ValueError, match=message):
        save_single_file(
            _tiny_unet(**kw), model.vae, model.text_encoder, tmp_path / "m.safetensors"
        )
    assert not (tmp_path / "m.safetensors").exists()


def test_wrong_model_classes_are_refused(tmp_path: Path) -> None:
    model = load_base(REF / "base")
    config = CLIPTextConfig.from_pretrained(REF / "base" / "text_encoder")
    with pytest.raises(TypeError, match="CLIPTextModel, got CLIPTextModelWithProjection"):
        save_single_file(
            model.unet, model.vae, CLIPTextModelWithProjection(config), tmp_path / "a.safetensors"
        )
    with pytest.raises(TypeError, match="AutoencoderKL, got UNet2DConditionModel"):
        save_single_file(model.unet, model.unet, model.text_encoder, tmp_path / "b.safetensors")
    vae = AutoencoderKL(
        block_out_channels=(32,),
        down_block_types=("AttnDownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=4,
    )
    with pytest.raises(ValueError, match="VAE down block type AttnDownEncoderBlock2D"):
        save_single_file(model.unet, vae, model.text_encoder, tmp_path / "c.safetensors")


# ----------------------------------------------------------------------------- kohya LoRAs

RANK = 4
STRENGTH = 0.75


@pytest.fixture(scope="module")
def image() -> ImageModel:
    return load_base(REF / "base")


def _pair(weight: torch.Tensor, gen: torch.Generator, scale: float) -> LoRAPair:
    out, inp = weight.shape[:2]
    kernel = weight.shape[2:]  # conv (LoCon) layers: down keeps the kernel, up is 1x1
    down = torch.randn(RANK, inp, *kernel, generator=gen)
    up = torch.randn(out, RANK, *(1 for _ in kernel), generator=gen)
    return LoRAPair(down, up, scale)


def lora_pairs(image: ImageModel, attention_only: bool = False) -> tuple[dict, dict]:
    """Random pairs on every spatial attention projection (+ proj_in convs) and on the text
    encoder's q/v projections; scale 0.5 (a power of two, so merges compare exactly)."""
    gen = torch.Generator().manual_seed(3)
    suffixes = ("to_q", "to_k", "to_v", "to_out.0") + (() if attention_only else ("proj_in",))
    unet = {
        n: _pair(m.weight, gen, 0.5)
        for n, m in image.unet.named_modules()
        if ".attentions." in n and n.endswith(suffixes)
    }
    text = {
        n: _pair(m.weight, gen, 0.5)
        for n, m in image.text_encoder.named_modules()
        if n.endswith(("q_proj", "v_proj"))
    }
    assert any(p.down.ndim == 4 for p in unet.values()) or attention_only
    return unet, text


def merged_reference(image: ImageModel, unet_pairs: dict, text_pairs: dict) -> ImageModel:
    ref = load_base(REF / "base")
    merge_lora(ref.unet, unet_pairs, STRENGTH)
    merge_lora(ref.text_encoder, text_pairs, STRENGTH)
    return ref


def assert_same_weights(a: ImageModel, b: ImageModel) -> None:
    for part in ("unet", "text_encoder"):
        wa, wb = weights(a, part), weights(b, part)
        for key, value in wa.items():
            assert torch.equal(value, wb[key]), f"{part}: {key}"


@pytest.mark.parametrize(
    "alpha, scalings", [(None, ("kohya", "official")), (2.0, ("kohya",)), (8.0, ("kohya",))]
)
def test_kohya_lora_merges_like_the_pairs(
    tmp_path: Path, image: ImageModel, alpha: float | None, scalings: tuple[str, ...]
) -> None:
    unet_pairs, text_pairs = lora_pairs(image)
    path = save_kohya_lora(
        unet_pairs,
        tmp_path / "l.safetensors",
        alpha,
        {"ss_network_dim": "4"},
        text_pairs=text_pairs,
    )
    sd = safetensors.torch.load_file(path)
    assert read_metadata(path) == {"ss_network_dim": "4"}
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    assert sd[f"{name}.alpha"].ndim == 0 and sd[f"{name}.alpha"].item() == (alpha or RANK)
    assert sd[f"{name}.lora_down.weight"].shape[0] == RANK
    assert "lora_te_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in sd
    assert len(sd) == 3 * (len(unet_pairs) + len(text_pairs))
    reference = merged_reference(image, unet_pairs, text_pairs)
    for scaling in scalings:
        model = load_base(REF / "base")
        apply_image_lora(model, path, STRENGTH, scaling)
        assert_same_weights(model, reference)
    parsed_unet, parsed_text = parse_kohya_lora(sd, str(path), image.unet, image.text_encoder)
    assert parsed_unet.keys() == unet_pairs.keys() and parsed_text.keys() == text_pairs.keys()
    for parsed, original in ((parsed_unet, unet_pairs), (parsed_text, text_pairs)):
        for target, pair in original.items():
            shape = (pair.up.shape[0], pair.down.flatten(1).shape[1])
            assert torch.equal(parsed[target].delta(shape), pair.delta(shape)), target


def test_kohya_from_official_trainer_file(tmp_path: Path, image: ImageModel) -> None:
    pairs, _ = lora_pairs(image, attention_only=True)
    official = save_state_dict(
        to_official_layout(pairs), tmp_path / "adapter.safetensors", {"animatediff.rank": "4"}
    )
    out = kohya_from_official(official, tmp_path / "kohya.safetensors")
    assert read_metadata(out) == {"animatediff.rank": "4"}
    model = load_base(REF / "base")
    apply_image_lora(model, out, STRENGTH, "kohya")
    assert_same_weights(model, merged_reference(image, pairs, {}))


def test_kohya_errors(tmp_path: Path, image: ImageModel) -> None:
    pair = LoRAPair(torch.zeros(RANK, 32), torch.zeros(32, RANK))
    motion = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.to_q"
    with pytest.raises(ValueError, match="motion modules"):
        save_kohya_lora({motion: pair}, tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="does not have rank 4"):
        save_kohya_lora(
            {"x.to_q": LoRAPair(torch.zeros(RANK, 32), torch.zeros(32, 3))},
            tmp_path / "b.safetensors",
        )
    with pytest.raises(ValueError, match="Linear \\(2-D\\) or Conv2d \\(4-D\\)"):
        save_kohya_lora(
            {"x.to_q": LoRAPair(torch.zeros(RANK), torch.zeros(32, RANK))},
            tmp_path / "c.safetensors",
        )
    with pytest.raises(ValueError, match="alpha must be positive"):
        save_kohya_lora({"x.to_q": pair}, tmp_path / "d.safetensors", alpha=0)
    with pytest.raises(ValueError, match="no LoRA layers"):
        save_kohya_lora({}, tmp_path / "e.safetensors")
    assert not list(tmp_path.iterdir())
