"""IP-Adapter (SD1.5): tiny random adapters in the released layouts (plain, plus, plus-face;
`.bin` pickles with nested groups and flat `.safetensors`) and a tiny random ViT image encoder,
loaded by this project and by diffusers' own `StableDiffusionPipeline.load_ip_adapter`, which is
the reference: same embeddings, same UNet outputs (2D and with motion modules, frames folded).

The UNet is the reference base's (SD1.5 layout: 16 cross-attentions, cross-attention width 32).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch
from conftest import REF_DIR
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from PIL import Image
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from animatediff import MotionUNet
from animatediff.checkpoints.io import CheckpointError, load_state_dict
from animatediff.checkpoints.kinds import check_kind
from animatediff.checkpoints.motion import load_motion_module
from animatediff.control.ip_adapter import CLIPImageProcessor, load_ip_adapter
from animatediff.motion.frames import fold_frames, per_frame_inputs, unfold_frames

BASE = REF_DIR / "base"
VARIANTS = ("plain", "plus", "plus-face")
FILES = {"plain": "ip-adapter_sd15", "plus": "ip-adapter-plus_sd15"}
FILES["plus-face"] = "ip-adapter-plus-face_sd15"
ENCODER = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4)
RESAMPLER = dict(hidden=128, heads=2, queries=16, depth=4)  # head width 64, as released
FRAMES = 4


# -- tiny models in the released layouts ---------------------------------------------------
def released_adapter(variant: str, unet, encoder_config, seed: int, width: int | None = None):
    """`{"image_proj": ..., "ip_adapter": ...}` with tencent-ailab's key names, random, fp16."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, base=0.0):
        return (base + 0.3 * torch.randn(*shape, generator=g)).half()

    width = width or unet.config.cross_attention_dim
    if variant == "plain":
        proj = {"proj.weight": rand(4 * width, encoder_config.projection_dim)}
        proj |= {"proj.bias": rand(4 * width), "norm.weight": rand(width, base=1)}
        proj |= {"norm.bias": rand(width)}
    else:
        proj = resampler_weights(rand, encoder_config.hidden_size, width)
    layers = {}
    names = [n for n in unet.attn_processors if n.endswith("attn2.processor")]
    for i, name in enumerate(names):  # processors numbered in order: attn1 even, attn2 odd
        hidden = hidden_size(unet, name)
        layers[f"{2 * i + 1}.to_k_ip.weight"] = rand(hidden, width)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = rand(hidden, width)
    return {"image_proj": proj, "ip_adapter": layers}


def hidden_size(unet, name: str) -> int:
    """An attention layer's width from its block, as the released training code derives it."""
    channels = list(unet.config.block_out_channels)
    if name.startswith("mid_block"):
        return channels[-1]
    block = int(name.split(".")[1])
    return channels[block] if name.startswith("down") else channels[::-1][block]


def resampler_weights(rand, embed: int, width: int) -> dict:
    hidden, inner, queries = RESAMPLER["hidden"], 64 * RESAMPLER["heads"], RESAMPLER["queries"]
    proj = {"latents": rand(1, queries, hidden), "proj_in.weight": rand(hidden, embed)}
    proj |= {"proj_in.bias": rand(hidden), "proj_out.weight": rand(width, hidden)}
    proj |= {"proj_out.bias": rand(width), "norm_out.weight": rand(width, base=1)}
    proj |= {"norm_out.bias": rand(width)}
    for i in range(RESAMPLER["depth"]):
        p = f"layers.{i}."
        for norm in ("0.norm1", "0.norm2", "1.0"):
            proj |= {f"{p}{norm}.weight": rand(hidden, base=1), f"{p}{norm}.bias": rand(hidden)}
        proj |= {
            f"{p}0.to_q.weight": rand(inner, hidden),
            f"{p}0.to_kv.weight": rand(2 * inner, hidden),
        }
        proj |= {
            f"{p}0.to_out.weight": rand(hidden, inner),
            f"{p}1.1.weight": rand(4 * hidden, hidden),
        }
        proj |= {f"{p}1.3.weight": rand(hidden, 4 * hidden)}
    return proj


def save_released(groups: dict, path: Path) -> Path:
    """`.bin`: the nested dict pickled; `.safetensors`: groups flattened with their prefixes."""
    if path.suffix == ".bin":
        torch.save(groups, path)
    else:
        flat = {f"{g}.{k}": v for g, inner in groups.items() for k, v in inner.items()}
        safetensors.torch.save_file(flat, path)
    return path


def fresh_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(BASE, subfolder="unet").eval()


def image(seed: int, size=(96, 128)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def as_tensor(images: list[Image.Image]) -> torch.Tensor:
    """PIL images -> (1, 3, k, H, W) in [0, 1]."""
    frames = [torch.from_numpy(np.array(i)).permute(2, 0, 1) / 255 for i in images]
    return torch.stack(frames, dim=1).unsqueeze(0)


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    config = CLIPVisionConfig(**ENCODER, image_size=224, patch_size=14, projection_dim=24)
    folder = tmp_path_factory.mktemp("image_encoder")
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, encoder_dir) -> dict[tuple[str, str], Path]:
    """(variant, "bin" | "safetensors") -> file, each variant with its own random weights."""
    folder = tmp_path_factory.mktemp("ip_adapters")
    unet, config = fresh_unet(), CLIPVisionConfig.from_pretrained(encoder_dir)
    files = {}
    for seed, variant in enumerate(VARIANTS):
        groups = released_adapter(variant, unet, config, seed)
        for fmt in ("bin", "safetensors"):
            files[variant, fmt] = save_released(groups, folder / f"{FILES[variant]}.{fmt}")
    return files


def reference_pipe(path: Path, encoder_dir: Path) -> StableDiffusionPipeline:
    """diffusers' own loading. Its feature extractor is CLIPImageProcessor(size, crop_size), the
    PIL one without torchvision; given explicitly so that an installed torchvision changes
    nothing (test_preprocessing_is_diffusers checks the configuration is the same)."""
    pipe = StableDiffusionPipeline.from_pretrained(
        BASE,
        image_encoder=CLIPVisionModelWithProjection.from_pretrained(encoder_dir),
        feature_extractor=CLIPImageProcessor(size=224, crop_size=224),
        safety_checker=None,
        requires_safety_checker=False,
    )
    pipe.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name)
    pipe.unet.eval()
    return pipe


def unet_inputs(batch: int, frames: int | None = None, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shape = (batch, 4, 8, 8) if frames is None else (batch, 4, frames, 8, 8)
    return torch.randn(shape, generator=g), 500, torch.randn(batch, 7, 32, generator=g)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    """max |actual - reference| / max |reference|: fp32 noise from batching images differently
    through the encoder is ~1e-6; a different computation is off by 1e-3 or more."""
    return max_diff(actual, reference) / reference.abs().max().item()


# -- against diffusers ------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["bin", "safetensors"])
@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_2d_unet_matches_diffusers(variant, fmt, adapters, encoder_dir):
    path = adapters[variant, fmt]
    pipe = reference_pipe(path, encoder_dir)
    reference = pipe.prepare_ip_adapter_image_embeds(image(1), None, "cpu", 1, True)
    unet = fresh_unet()
    ip = load_ip_adapter(path, encoder_dir, unet)
    assert ip.variant == variant
    x, t, text = unet_inputs(2)
    without = unet(x, t, text).sample
    ip.attach(unet)
    embeds = ip.embed(image(1), num_frames=1).for_frames([0], batch=1, guidance=True)
    assert len(embeds) == 1 and torch.equal(embeds[0], reference[0])
    out = unet(x, t, text, added_cond_kwargs={"image_embeds": embeds}).sample
    ref = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": reference}).sample
    assert max_diff(out, ref) < 1e-6
    assert max_diff(out, without) > 1e-3  # the adapter does something


@pytest.mark.parametrize("variant", VARIANTS)
@torch.no_grad()
def test_motion_unet_matches_diffusers(variant, adapters, encoder_dir):
    """Frames folded into the batch, one image for the clip (diffusers' UNetMotionModel
    repeats the embeddings per frame) and one image per frame (given as a tensor)."""
    path = adapters[variant, "safetensors"]
    pipe = reference_pipe(path, encoder_dir)
    ref_model = MotionUNet(pipe.unet, load_motion_module(REF_DIR / "mm_v2.ckpt"))
    model = MotionUNet(fresh_unet(), load_motion_module(REF_DIR / "mm_v2.ckpt"))
    ip = load_ip_adapter(path, encoder_dir, model)
    ip.attach(model)
    x, t, text = unet_inputs(2, FRAMES)

    one = pipe.prepare_ip_adapter_image_embeds(image(1), None, "cpu", 1, True)
    ref = ref_model(
        x, t, text, added_cond_kwargs={"image_embeds": [one[0].repeat_interleave(FRAMES, 0)]}
    )
    embeds = ip.embed(image(1), FRAMES).for_frames(range(FRAMES), batch=1, guidance=True)
    assert max_diff(model(x, t, text, added_cond_kwargs={"image_embeds": embeds}), ref) < 1e-6

    images = [image(10 + i) for i in range(FRAMES)]
    each = [pipe.prepare_ip_adapter_image_embeds(im, None, "cpu", 1, True)[0] for im in images]
    # rows (b f), b = [uncond video; cond video]
    rows = torch.cat([e[:1] for e in each] + [e[1:] for e in each])
    ref = ref_model(x, t, text, added_cond_kwargs={"image_embeds": [rows]})
    embeds = ip.embed(as_tensor(images), FRAMES).for_frames(range(FRAMES), 1, True)
    assert rel_err(embeds[0], rows) < 1e-5  # the encoder saw 4 images at once, diffusers 1
    assert rel_err(model(x, t, text, added_cond_kwargs={"image_embeds": embeds}), ref) < 1e-5


@torch.no_grad()
def test_scales_match_diffusers(adapters, encoder_dir):
    path = adapters["plus", "bin"]
    pipe = reference_pipe(path, encoder_dir)
    unet = fresh_unet()
    ip = load_ip_adapter(path, encoder_dir, unet)
    ip.attach(unet)
    embeds = ip.embed(image(2), 1).for_frames([0], 1, True)
    x, t, text = unet_inputs(2)
    style = {"up": {"block_1": [0.0, 1.0, 0.0]}, "down": {"block_2": 0.5}}  # InstantStyle-like
    flat = {"up_blocks.1.attentions.1": 1.0, "down_blocks.2": 0.5}
    outputs = []
    for scale in (0.5, style, flat):
        ip.scale = scale
        outputs.append(unet(x, t, text, added_cond_kwargs={"image_embeds": embeds}).sample)
    for scale, out in zip((0.5, style), outputs):
        pipe.set_ip_adapter_scale(scale)
        ref = pipe.unet(x, t, text, added_cond_kwargs={"image_embeds": embeds}).sample
        assert max_diff(out, ref) < 1e-6
    assert torch.equal(outputs[1], outputs[2])
    assert max_diff(outputs[0], outputs[1]) > 1e-4
    with pytest.raises(ValueError, match="up_blocks.0"):
        ip.scale = {"up": {"block_0": 1.0}}  # UpBlock2D: no attention there
    with pytest.raises(ValueError, match="3 attention layers, 2 scales"):
        ip.scale = {"up": {"block_1": [1.0, 0.0]}}


def test_preprocessing_is_diffusers(encoder_dir):
    """The processor configuration diffusers builds (`CLIPImageProcessor(size, crop_size)`):
    shortest side 224 bicubic, centre crop 224, CLIP mean/std."""
    from transformers import CLIPImageProcessor as DiffusersChoice

    mine = CLIPImageProcessor(size=224, crop_size=224).to_dict()
    theirs = DiffusersChoice(size=224, crop_size=224).to_dict()
    for key in ("size", "crop_size", "resample", "image_mean", "image_std", "rescale_factor"):
        assert mine[key] == theirs[key], key
    assert mine["resample"] == Image.Resampling.BICUBIC
    assert mine["size"] == {"shortest_edge": 224}


# -- behaviour ------------------------------------------------------------------------------
@pytest.fixture
def attached(adapters, encoder_dir):
    """(MotionUNet with the plus adapter attached, the adapter)."""
    model = MotionUNet(fresh_unet(), load_motion_module(REF_DIR / "mm_v2.ckpt"))
    ip = load_ip_adapter(adapters["plus", "safetensors"], encoder_dir, model)
    ip.attach(model)
    return model, ip


@torch.no_grad()
def test_scale_zero_is_exactly_without_adapter(attached):
    model, ip = attached
    x, t, text = unet_inputs(2, FRAMES)
    embeds = ip.embed(image(3), FRAMES).for_frames(range(FRAMES), 1, True)
    with_adapter = model(x, t, text, added_cond_kwargs={"image_embeds": embeds})
    ip.scale = 0.0
    off = model(x, t, text, added_cond_kwargs={"image_embeds": embeds})
    ip.detach()
    # equal up to rounding: without the adapter, text shared by the frames is projected once
    # per video (MotionUNet's SharedTextAttention), with it once per frame
    assert rel_err(off, model(x, t, text)) < 1e-4
    assert max_diff(with_adapter, off) > 1e-3


@torch.no_grad()
def test_detach_restores_the_unet_bitwise(adapters, encoder_dir):
    unet = fresh_unet()
    x, t, text = unet_inputs(2)
    before = unet(x, t, text).sample
    keys, processors = list(unet.state_dict()), unet.attn_processors
    ip = load_ip_adapter(adapters["plain", "bin"], encoder_dir, unet)
    ip.attach(unet)
    assert unet.config.encoder_hid_dim_type == "ip_image_proj"
    assert any("to_k_ip" in k for k in unet.state_dict())
    with pytest.raises(RuntimeError, match="already attached"):
        ip.attach(unet)
    embeds = ip.embed(image(4), 1).for_frames([0], 1, True)
    unet(x, t, text, added_cond_kwargs={"image_embeds": embeds})
    ip.detach()
    assert torch.equal(unet(x, t, text).sample, before)
    assert list(unet.state_dict()) == keys
    assert all(unet.attn_processors[k] is v for k, v in processors.items())
    assert unet.encoder_hid_proj is None and unet.config.encoder_hid_dim_type is None
    ip.attach(unet)  # attachable again
    ip.detach()


@torch.no_grad()
def test_per_frame_image_reaches_only_its_frame(attached):
    """At motion scale 0 frames do not mix: a new image for frame 3 changes frame 3 of the
    conditional video only (the unconditional half has no image)."""
    model, ip = attached
    x, t, text = unet_inputs(2, FRAMES + 1)
    images = [image(20 + i) for i in range(FRAMES + 1)]
    outs = []
    for imgs in (images, images[:3] + [image(99)] + images[4:]):
        embeds = ip.embed(imgs, FRAMES + 1).for_frames(range(FRAMES + 1), 1, True)
        kwargs = dict(added_cond_kwargs={"image_embeds": embeds}, motion_scale=0.0)
        outs.append(model(x, t, text, **kwargs))
    diff = (outs[0] - outs[1]).abs().amax(dim=(1, 3, 4))  # (b, f)
    assert diff[1, 3] > 1e-4
    diff[1, 3] = 0
    assert diff.max() == 0


@torch.no_grad()
def test_window_equals_the_full_computation_on_its_frames(adapters, encoder_dir):
    """Two videos with their own per-frame images, guidance: a context window's slice gives
    what the whole clip gives on those frames (2D UNet, frames folded)."""
    unet = fresh_unet()
    ip = load_ip_adapter(adapters["plain", "safetensors"], encoder_dir, unet)
    ip.attach(unet)
    num_frames, window = 6, [1, 2, 4]
    images = torch.rand(2, 3, num_frames, 64, 80, generator=torch.Generator().manual_seed(5))
    embeds = ip.embed(images, num_frames)
    x, t, text = unet_inputs(4, num_frames)

    def run(frames, image_frames=None):
        sample = x[:, :, frames]
        step, per_frame_text = per_frame_inputs(t, text, 4, len(frames), sample.device)
        rows = embeds.for_frames(image_frames or frames, batch=2, guidance=True)
        kwargs = {"image_embeds": rows}
        out = unet(fold_frames(sample), step, per_frame_text, added_cond_kwargs=kwargs).sample
        return unfold_frames(out, len(frames))

    full = run(list(range(num_frames)))[:, :, window]
    assert rel_err(run(window), full) < 1e-5  # fp32 noise of a smaller batch
    assert rel_err(run(window, image_frames=[0, 1, 2]), full) > 1e-3  # other frames' images


@torch.no_grad()
def test_follows_the_unet_dtype(adapters, encoder_dir):
    """attach moves the adapter and its encoder to the UNet's dtype; embeddings follow."""
    x, t, text = unet_inputs(2)
    outs = []
    for dtype in (torch.float32, torch.bfloat16):
        unet = fresh_unet().to(dtype)
        ip = load_ip_adapter(adapters["plus", "bin"], encoder_dir, unet)
        ip.attach(unet)
        embeds = ip.embed(image(6), 1).for_frames([0], 1, True)
        assert embeds[0].dtype == dtype and ip.image_encoder.dtype == dtype
        kwargs = {"image_embeds": embeds}
        outs.append(unet(x.to(dtype), t, text.to(dtype), added_cond_kwargs=kwargs).sample)
    assert outs[1].dtype == torch.bfloat16
    assert rel_err(outs[1].float(), outs[0]) < 0.05


def test_for_frames_layout(adapters, encoder_dir):
    unet = fresh_unet()
    ip = load_ip_adapter(adapters["plain", "bin"], encoder_dir, unet)
    embeds = ip.embed([image(i) for i in range(3)], 3)
    cond, uncond = embeds.cond, embeds.uncond  # (1, 3, 24), (1, 1, 24)
    rows = embeds.for_frames([2, 0], batch=2, guidance=True)[0]
    assert rows.shape == (8, 1, 24)
    assert torch.equal(rows[:4], uncond.expand(4, 1, 24)) and not uncond.any()
    assert torch.equal(rows[4:, 0], cond[0, [2, 0, 2, 0]])
    one = ip.embed(image(0), 3)
    single = one.for_frames([1, 2], batch=1, guidance=False)[0]
    assert torch.equal(single, one.cond[0, :1].expand(2, 24).unsqueeze(1))
    with pytest.raises(ValueError, match="0..2"):
        embeds.for_frames([3], 1, True)
    with pytest.raises(ValueError, match="2 per video"):
        ip.embed([image(0), image(1)], 3)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        ip.embed(torch.full((1, 3, 1, 8, 8), 255.0), 3)
    two = ip.embed(torch.rand(2, 3, 1, 32, 32), 3)
    with pytest.raises(ValueError, match="2 videos"):
        two.for_frames([0], batch=3, guidance=True)


# -- files ----------------------------------------------------------------------------------
def test_nested_bin_loads_like_safetensors(adapters):
    nested = load_state_dict(adapters["plus", "bin"])
    flat = load_state_dict(adapters["plus", "safetensors"])
    assert nested.keys() == flat.keys()
    assert "image_proj.latents" in nested and "ip_adapter.1.to_k_ip.weight" in nested
    assert all(torch.equal(nested[k], flat[k]) for k in flat)


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_malicious_bin_is_refused_without_running_code(tmp_path, encoder_dir):
    marker, path = tmp_path / "ran", tmp_path / "ip-adapter_sd15.bin"
    torch.save({"image_proj": {"proj.weight": _RunsCode(marker)}, "ip_adapter": {}}, path)
    with pytest.raises(CheckpointError, match="refused for safety"):
        load_ip_adapter(path, encoder_dir, fresh_unet())
    assert not marker.exists()


def _bad_files(unet, config) -> dict[str, tuple[dict, str]]:
    plain = released_adapter("plain", unet, config, 0)
    few = {k: v for k, v in plain["ip_adapter"].items() if int(k.split(".")[0]) < 20}
    full_face = {f"proj.{i}.weight": torch.zeros(2, 2) for i in (0, 2, 3)}
    face_id = {"proj.0.weight": torch.zeros(2, 2), "norm.weight": torch.zeros(2)}
    lora = {**plain["ip_adapter"], "1.to_k_lora.down.weight": torch.zeros(2, 2)}
    return {
        "wide": (released_adapter("plain", unet, config, 0, width=48), "48 wide .* takes 32"),
        "wide-plus": (released_adapter("plus", unet, config, 0, width=48), "48 wide"),
        "layers": ({**plain, "ip_adapter": few}, "has 10 cross-attention layers, this UNet has 16"),
        "full-face": ({**plain, "image_proj": full_face}, "full-face"),
        "faceid": ({**plain, "image_proj": face_id}, "FaceID"),
        "faceid-lora": ({**plain, "ip_adapter": lora}, "FaceID"),
        "not-ip": ({"unet": plain["ip_adapter"]}, "not an IP-Adapter"),
    }


@pytest.mark.parametrize(
    "case", ["wide", "wide-plus", "layers", "full-face", "faceid", "faceid-lora", "not-ip"]
)
def test_bad_files_give_one_line_naming_the_file(case, tmp_path, encoder_dir):
    unet = fresh_unet()
    groups, message = _bad_files(unet, CLIPVisionConfig.from_pretrained(encoder_dir))[case]
    path = save_released(groups, tmp_path / f"{case}.safetensors")
    with pytest.raises(CheckpointError, match=message) as info:
        load_ip_adapter(path, encoder_dir, unet)
    assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)


def test_wrong_image_encoder_is_named(adapters, tmp_path):
    config = CLIPVisionConfig(**ENCODER, image_size=224, patch_size=14, projection_dim=16)
    other = CLIPVisionModelWithProjection(config)
    for variant, wanted in (("plain", "24-wide image embeddings"), ("plus", None)):
        path = adapters[variant, "bin"]
        if wanted is None:  # plus reads hidden states: a narrower encoder
            config = CLIPVisionConfig(**{**ENCODER, "hidden_size": 16}, projection_dim=24)
            other, wanted = CLIPVisionModelWithProjection(config), "32-wide image-encoder hidden"
        with pytest.raises(CheckpointError, match=wanted) as info:
            load_ip_adapter(path, other, fresh_unet())
        assert str(info.value).startswith(str(path)) and "\n" not in str(info.value)
    with pytest.raises(CheckpointError, match="no config.json"):
        load_ip_adapter(adapters["plain", "bin"], tmp_path, fresh_unet())


# -- through the pipeline and the command line -------------------------------------------------
def test_pipeline_with_ip_adapter(adapters, encoder_dir, tmp_path):
    """`load(ip_adapter=...)` + `ip_adapter_images=`: the reference image steers the video,
    scale 0 is exactly the video without it, windows work, and the UNet is given back as it
    was (a later call without images is the plain pipeline). The CLI takes the same options."""
    from animatediff import AnimationPipeline
    from animatediff.cli.main import main

    path = adapters["plus", "safetensors"]
    pipe = AnimationPipeline.load(
        base=BASE, motion_module=REF_DIR / "mm_v3.ckpt", ip_adapter=path, image_encoder=encoder_dir
    )
    run = dict(num_frames=6, height=64, width=64, num_inference_steps=2, seed=3, progress=False)
    plain = pipe("a boy", **run).frames
    ref = image(1)
    steered = pipe("a boy", ip_adapter_images=ref, **run).frames
    assert (steered - plain).abs().max() > 1e-3
    off = pipe("a boy", ip_adapter_images=ref, ip_adapter_scale=0.0, **run).frames
    assert (off - plain).abs().max() < 1e-5  # rounding: text per frame with it, per video without
    assert torch.equal(pipe("a boy", **run).frames, plain)
    windowed = pipe("a boy", ip_adapter_images=[image(i) for i in range(6)], context_length=4,
                    context_overlap=2, **run)  # fmt: skip
    assert windowed.frames.shape == plain.shape
    ref.save(tmp_path / "ref.png")
    out = tmp_path / "ip.gif"
    assert 0 == main(
        ["generate", "a boy", "--base", str(BASE), "--motion-module", str(REF_DIR / "mm_v3.ckpt"),
         "--ip-adapter", f"{path}:0.7", "--image-encoder", str(encoder_dir),
         "--ip-adapter-images", str(tmp_path / "ref.png"), "--frames", "6", "--width", "64",
         "--height", "64", "--steps", "2", "--seed", "3", "-o", str(out)]
    )  # fmt: skip
    settings = json.loads((tmp_path / "ip.gif.json").read_text())
    assert settings["control"]["ip_adapter_scale"] == 0.7
    assert settings["models"]["ip_adapter"] == str(path)


def test_default_image_encoder_beside_the_adapter_else_the_released_one(
    adapters, encoder_dir, tmp_path, monkeypatch
):
    """Without `image_encoder=`: `image_encoder/` beside the adapter (the released repository's
    layout); else the released SD1.5 encoder by name (a hub download lands the adapter alone),
    which offline and not cached is one line naming it."""
    from huggingface_hub import constants

    from animatediff.pipeline.pipeline import _image_encoder

    shutil.copytree(encoder_dir, tmp_path / "models" / "image_encoder")
    beside = shutil.copy(adapters["plain", "safetensors"], tmp_path / "models")
    assert _image_encoder(Path(beside), None) == tmp_path / "models" / "image_encoder"
    check_kind(beside, "ip_adapter")  # the command line's header check takes the release
    assert _image_encoder(Path(beside), encoder_dir) == encoder_dir
    alone = shutil.copy(adapters["plain", "safetensors"], tmp_path)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CheckpointError, match="ip-adapter-image-encoder") as info:
        _image_encoder(Path(alone), None)
    assert "\n" not in str(info.value)
