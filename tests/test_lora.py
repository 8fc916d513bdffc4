"""LoRAs: MotionLoRA in every supported file format, several at once, removal and strength;
kohya image LoRAs with their alpha scaling conventions and conv (LoCon) layers.

References are computed here by hand, independently of the project's LoRA code: the official
merge `W += strength * up @ down` applied to the weights directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from animatediff import AnimationPipeline
from animatediff.checkpoints.adapters import apply_image_lora
from animatediff.checkpoints.base import load_base
from animatediff.checkpoints.io import load_state_dict, save_state_dict
from animatediff.checkpoints.kinds import check_kind
from animatediff.checkpoints.lora import parse_attention_lora, to_official_layout
from animatediff.lora import LoRAPair

STRENGTH = 0.7


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return ((actual.double() - reference).abs().max() / reference.abs().max()).item()


# ----------------------------------------------------------------------------- format helpers


def official_target(key: str) -> tuple[str, str]:
    """`X.processor.to_q_lora.down.weight` -> (`X.to_q`, "down"); `to_out` targets `to_out.0`."""
    module, rest = key.split(".processor.")
    proj, side, _ = rest.split(".")
    proj = proj.removesuffix("_lora")
    return f"{module}.{proj}" + (".0" if proj == "to_out" else ""), side


def to_diffusers_format(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers' conversion of an official MotionLoRA: `unet.` prefix, no
    `.temporal_transformer`, `attention_blocks.N` -> `attn{N+1}`, processor keys kept."""
    out = {}
    for key, value in sd.items():
        new = key.replace(".temporal_transformer", "")
        new = new.replace("attention_blocks.0", "attn1").replace("attention_blocks.1", "attn2")
        out["unet." + new] = value
    return out


def to_peft_format(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """PEFT names: `<prefix><diffusers module>.attn1.to_q.lora_A.weight` / `lora_B`."""
    out = {}
    for key, value in sd.items():
        target, side = official_target(key)
        target = target.replace(".temporal_transformer", "")
        target = target.replace("attention_blocks.0", "attn1").replace(
            "attention_blocks.1", "attn2"
        )
        out[f"{prefix}{target}.{'lora_A' if side == 'down' else 'lora_B'}.weight"] = value
    return out


def random_motion_lora(reference: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Another MotionLoRA in the official format: random, rank 4, on a subset of the layers."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for key, value in reference.items():
        if ".attention_blocks.1." not in key or not key.startswith(("up_blocks", "mid_block")):
            continue
        shape = (4, value.shape[1]) if key.endswith("down.weight") else (value.shape[0], 4)
        out[key] = torch.randn(shape, generator=g) * 0.2
    assert out
    return out


# ------------------------------------------------------------------------------- MotionLoRA


@pytest.fixture(scope="module")
def pipe(ref_dir):
    return AnimationPipeline.load(base=ref_dir / "base", motion_module=ref_dir / "mm_v2.ckpt")


@pytest.fixture(scope="module")
def inputs(expected):
    return (
        expected["unet.sample"][:1, :, :8].clone(),  # 8 frames: no reference comparison here
        expected["unet.timestep"],
        expected["unet.encoder_hidden_states"][:1].clone(),
    )


@pytest.fixture(scope="module")
def official_sd(ref_dir) -> dict[str, torch.Tensor]:
    return torch.load(ref_dir / "motion_lora_v2.ckpt", map_location="cpu", weights_only=True)


@torch.no_grad()
def unet_out(pipe, inputs) -> torch.Tensor:
    return pipe.unet(*inputs)


@pytest.fixture(scope="module")
def baseline(pipe, inputs) -> torch.Tensor:
    assert not pipe.motion_loras
    return unet_out(pipe, inputs)


@torch.no_grad()
def merged_by_hand(
    pipe, inputs, loras: list[tuple[dict[str, torch.Tensor], float]]
) -> torch.Tensor:
    """The output with each official-format LoRA merged into the motion weights by hand."""
    assert not pipe.motion_loras
    motion = pipe.unet.motion
    saved = {k: v.clone() for k, v in motion.state_dict().items()}
    try:
        for sd, strength in loras:
            for key in sd:
                target, side = official_target(key)
                if side != "down":
                    continue
                up = sd[key.replace(".down.weight", ".up.weight")]
                weight = motion.get_submodule(target).weight
                weight += strength * (up @ sd[key])
        return unet_out(pipe, inputs)
    finally:
        motion.load_state_dict(saved)


def out_with(pipe, inputs, loras: list[tuple[Path, float]]) -> torch.Tensor:
    names = [pipe.add_motion_lora(path, strength) for path, strength in loras]
    try:
        return unet_out(pipe, inputs)
    finally:
        for name in names:
            pipe.remove_motion_lora(name)


@pytest.fixture(scope="module")
def official_out(pipe, inputs, ref_dir, baseline) -> torch.Tensor:
    return out_with(pipe, inputs, [(ref_dir / "motion_lora_v2.ckpt", STRENGTH)])


def test_official_motion_lora_equals_merge(pipe, inputs, official_sd, official_out, baseline):
    reference = merged_by_hand(pipe, inputs, [(official_sd, STRENGTH)])
    assert rel_err(official_out, reference) < 1e-5
    assert rel_err(official_out, baseline) > 1e-3  # the LoRA does something


@pytest.mark.parametrize("fmt", ["diffusers", "peft_unet", "peft_base_model"])
def test_motion_lora_formats_agree(fmt, pipe, inputs, official_sd, official_out, tmp_path):
    sd = {
        "diffusers": lambda: to_diffusers_format(official_sd),
        "peft_unet": lambda: to_peft_format(official_sd, "unet."),
        "peft_base_model": lambda: to_peft_format(official_sd, "base_model.model."),
    }[fmt]()
    assert not set(sd) & set(official_sd)
    path = save_state_dict(sd, tmp_path / f"motion_lora_{fmt}.safetensors")
    check_kind(path, "motion_lora")  # the command line's header check takes every layout
    out = out_with(pipe, inputs, [(path, STRENGTH)])
    assert torch.equal(out, official_out)


def test_two_motion_loras_each_with_its_strength(
    pipe, inputs, official_sd, ref_dir, tmp_path, baseline
):
    second = random_motion_lora(official_sd, seed=3)
    second_path = save_state_dict(second, tmp_path / "second.safetensors")
    loras = [(ref_dir / "motion_lora_v2.ckpt", 0.7), (second_path, -0.5)]
    out = out_with(pipe, inputs, loras)
    reference = merged_by_hand(pipe, inputs, [(official_sd, 0.7), (second, -0.5)])
    assert rel_err(out, reference) < 1e-5
    only_first = merged_by_hand(pipe, inputs, [(official_sd, 0.7)])
    assert rel_err(out, only_first) > 1e-4  # the second one counts


def test_remove_motion_lora_restores_exact_output(pipe, inputs, ref_dir, baseline):
    name = pipe.add_motion_lora(ref_dir / "motion_lora_v2.ckpt", STRENGTH)
    with_lora = unet_out(pipe, inputs)
    pipe.remove_motion_lora(name)
    assert not pipe.motion_loras
    assert (with_lora - baseline).abs().max() > 1e-3  # it had an effect to undo
    assert torch.equal(unet_out(pipe, inputs), baseline)


def test_strength_zero_and_set_strength(pipe, inputs, ref_dir, baseline, official_out):
    name = pipe.add_motion_lora(ref_dir / "motion_lora_v2.ckpt", 0.0)
    try:
        assert torch.equal(unet_out(pipe, inputs), baseline)
        pipe.set_motion_lora_strength(name, STRENGTH)
        assert torch.equal(unet_out(pipe, inputs), official_out)
        pipe.set_motion_lora_strength(name, 0.0)
        assert torch.equal(unet_out(pipe, inputs), baseline)
    finally:
        pipe.remove_motion_lora(name)


def test_to_official_layout_round_trip(official_sd):
    pairs = parse_attention_lora(official_sd, "motion_lora_v2.ckpt")
    assert len(pairs) * 2 == len(official_sd)
    again = to_official_layout(pairs)
    assert sorted(again) == sorted(official_sd)
    assert all(torch.equal(again[k], official_sd[k]) for k in official_sd)
    for converted in (to_diffusers_format(official_sd), to_peft_format(official_sd, "unet.")):
        out = to_official_layout(parse_attention_lora(converted, "converted"))
        assert sorted(out) == sorted(official_sd)
        assert all(torch.equal(out[k], official_sd[k]) for k in official_sd)
    # a pair's own scale is baked into `up` (the format has none): same weight update
    target, pair = next(iter(pairs.items()))
    scaled = LoRAPair(pair.down, pair.up, 0.25)
    back = parse_attention_lora(to_official_layout({target: scaled}), "scaled")[target]
    shape = (pair.up.shape[0], pair.down.shape[1])
    assert torch.allclose(back.delta(shape), 0.25 * pair.up @ pair.down, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------- kohya image LoRA

KOHYA_STRENGTH = 0.8
UNET_LAYER = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k"
UNET_MODULE = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
TEXT_LAYER = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"
TEXT_MODULE = "encoder.layers.1.self_attn.q_proj"


@pytest.fixture(scope="module")
def image_model_once(ref_dir):
    return load_base(ref_dir / "base")


@pytest.fixture
def image_model(image_model_once):
    """The module's ImageModel, put back to the base weights after each test."""
    unet = {k: v.clone() for k, v in image_model_once.unet.state_dict().items()}
    text = {k: v.clone() for k, v in image_model_once.text_encoder.state_dict().items()}
    yield image_model_once
    image_model_once.unet.load_state_dict(unet)
    image_model_once.text_encoder.load_state_dict(text)


@pytest.fixture(scope="module")
def kohya_sd(ref_dir) -> dict[str, torch.Tensor]:
    sd = load_state_dict(ref_dir / "kohya_lora.safetensors")
    assert all(float(v) == 8 for k, v in sd.items() if k.endswith(".alpha"))  # alpha == rank
    return sd


def text_module(image_model, layer: str):
    assert layer == TEXT_LAYER
    modules = dict(image_model.text_encoder.named_modules())
    # transformers < 5 names it `text_model.encoder...`, >= 5 `encoder...`
    return modules.get(f"text_model.{TEXT_MODULE}") or modules[TEXT_MODULE]


def merged_weights(image_model, sd, path: Path, strength: float, scaling: str):
    save_state_dict(sd, path)
    apply_image_lora(image_model, path, strength, scaling)
    unet = image_model.unet.get_submodule(UNET_MODULE).weight.detach().clone()
    text = text_module(image_model, TEXT_LAYER).weight.detach().clone()
    all_unet = {k: v.clone() for k, v in image_model.unet.state_dict().items()}
    return unet, text, all_unet


def test_kohya_alpha_scaling(image_model, kohya_sd, tmp_path):
    unet0 = image_model.unet.get_submodule(UNET_MODULE).weight.detach().clone()
    text0 = text_module(image_model, TEXT_LAYER).weight.detach().clone()
    unet_sd0 = {k: v.clone() for k, v in image_model.unet.state_dict().items()}
    text_sd0 = {k: v.clone() for k, v in image_model.text_encoder.state_dict().items()}

    def reset():
        image_model.unet.load_state_dict(unet_sd0)
        image_model.text_encoder.load_state_dict(text_sd0)

    alpha, rank = 2.0, 8
    edited = {k: (torch.tensor(alpha) if k.endswith(".alpha") else v) for k, v in kohya_sd.items()}
    k_unet, k_text, k_all = merged_weights(
        image_model, edited, tmp_path / "a.safetensors", KOHYA_STRENGTH, "kohya"
    )
    reset()
    o_unet, o_text, o_all = merged_weights(
        image_model, edited, tmp_path / "b.safetensors", KOHYA_STRENGTH * alpha / rank, "official"
    )
    reset()
    i_unet, i_text, _ = merged_weights(
        image_model, edited, tmp_path / "c.safetensors", KOHYA_STRENGTH, "official"
    )
    reset()
    r_unet, r_text, _ = merged_weights(
        image_model, kohya_sd, tmp_path / "d.safetensors", KOHYA_STRENGTH, "official"
    )

    def by_hand(w0, layer, factor):
        up, down = kohya_sd[f"{layer}.lora_up.weight"], kohya_sd[f"{layer}.lora_down.weight"]
        return w0 + factor * (up @ down)

    # 'kohya' scales by alpha / rank ...
    assert torch.allclose(
        k_unet, by_hand(unet0, UNET_LAYER, KOHYA_STRENGTH * alpha / rank), atol=1e-6
    )
    assert torch.allclose(
        k_text, by_hand(text0, TEXT_LAYER, KOHYA_STRENGTH * alpha / rank), atol=1e-6
    )
    # ... which equals the official merge at strength * alpha / rank, on every layer
    assert k_all.keys() == o_all.keys()
    for key in k_all:
        assert torch.allclose(k_all[key], o_all[key], atol=1e-6), key
    assert torch.allclose(k_text, o_text, atol=1e-6)
    # 'official' ignores alpha: same as the file whose alpha equals rank
    assert torch.equal(i_unet, r_unet) and torch.equal(i_text, r_text)
    assert torch.allclose(i_unet, by_hand(unet0, UNET_LAYER, KOHYA_STRENGTH), atol=1e-6)
    assert not torch.allclose(i_unet, k_unet, atol=1e-4)


def test_locon_conv_layer(image_model, kohya_sd, tmp_path):
    conv = image_model.unet.get_submodule("down_blocks.0.resnets.0.conv1")
    neighbour = image_model.unet.get_submodule("down_blocks.0.resnets.0.conv2")
    w0, n0 = conv.weight.detach().clone(), neighbour.weight.detach().clone()
    out_ch, in_ch, kh, kw = w0.shape
    assert (kh, kw) == (3, 3)
    rank, alpha, strength = 4, 2.0, 0.6
    g = torch.Generator().manual_seed(5)
    down = torch.randn(rank, in_ch, 3, 3, generator=g) * 0.1
    up = torch.randn(out_ch, rank, 1, 1, generator=g) * 0.1
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    sd = dict(kohya_sd)
    sd.update(
        {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(alpha),
        }
    )
    path = save_state_dict(sd, tmp_path / "locon.safetensors")
    apply_image_lora(image_model, path, strength, "kohya")
    merged = conv.weight.detach()

    factor = strength * alpha / rank
    delta = torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)
    assert torch.allclose(merged, w0 + factor * delta, atol=1e-6)
    assert torch.equal(neighbour.weight, n0)  # no LoRA there
    # the merged conv computes conv(x) + factor * up(down(x)), as LoCon means
    x = torch.randn(1, in_ch, 8, 8, generator=g)
    expected_out = F.conv2d(x, w0, conv.bias, padding=1) + factor * F.conv2d(
        F.conv2d(x, down, padding=1), up
    )
    assert torch.allclose(F.conv2d(x, merged, conv.bias, padding=1), expected_out, atol=1e-5)
