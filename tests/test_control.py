"""Control and init: SparseCtrl against the official outputs, standard ControlNets per frame,
img2vid and vid2vid, through the library, the CLI and the config file.

SparseCtrl cases run on the reference files (the released layouts, random weights); the rest use
the reference base at 64x64 with few frames and steps, so each generation takes about a second.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import NEGATIVE_PROMPT, PROMPT, REF_DIR, pipeline_case_kwargs
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from animatediff import AnimationPipeline
from animatediff.checkpoints.io import CheckpointError, save_state_dict
from animatediff.cli.main import main
from animatediff.control import load_controlnet, load_sparsectrl, sparse_condition
from animatediff.vae import decode_latents, encode_frames

FAST = dict(num_frames=8, height=64, width=64, num_inference_steps=2, progress=False, seed=3)


def official(pipe, **kwargs) -> torch.Tensor:
    """The reference settings (16 frames, 128x128, 3 DDIM steps, fixed latents)."""
    return pipe(
        PROMPT,
        NEGATIVE_PROMPT,
        num_frames=16,
        height=128,
        width=128,
        num_inference_steps=3,
        guidance_scale=7.5,
        progress=False,
        **kwargs,
    ).frames


# -- SparseCtrl ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sparse_pipes() -> dict[str, AnimationPipeline]:
    return {
        kind: AnimationPipeline.load(**pipeline_case_kwargs(f"v3_sparsectrl_{kind}"))
        for kind in ("rgb", "scribble")
    }


def keyframes(expected, kind: str) -> tuple[torch.Tensor, list[int]]:
    index = [int(i) for i in expected[f"sparsectrl.{kind}.index"].tolist()]
    return expected[f"sparsectrl.{kind}.images"], index


@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_sparsectrl_matches_official(kind, sparse_pipes, expected):
    images, index = keyframes(expected, kind)
    assert index == ([0] if kind == "rgb" else [0, 8])
    video = official(
        sparse_pipes[kind],
        latents=expected["pipe.latents"].clone(),
        control_images=images,
        control_frames=index,
        control_scale=1.0,
    )
    reference = expected[f"pipe.video.v3_sparsectrl_{kind}"]
    diff = (video - reference).abs().max().item()
    assert diff < 1e-4, f"{kind}: max abs diff {diff:.3g}"
    # Not the unconditioned video: the control is doing something measurable.
    assert (reference - expected["pipe.video.v3_adapter_personal"]).abs().max() > 1e-2


def test_rgb_condition_is_the_vae_posterior_mean(sparse_pipes, expected):
    pipe = sparse_pipes["rgb"]
    images, index = keyframes(expected, "rgb")
    cond = sparse_condition(pipe.sparsectrl, images, index, 16, pipe.vae, (16, 16))
    assert (cond.condition[:, :, index] - expected["sparsectrl.rgb.cond"]).abs().max() < 1e-5
    assert cond.condition[:, :, 1:].abs().max() == 0
    assert cond.mask[:, :, 0].min() == 1 and cond.mask[:, :, 1:].max() == 0
    sampled = sparse_condition(
        pipe.sparsectrl,
        images,
        index,
        16,
        pipe.vae,
        (16, 16),
        sample_posterior=True,
        generator=torch.Generator().manual_seed(0),
    )
    # a sample of the posterior, not its mean: the keyframe's latents move, the rest stay zero
    assert (sampled.condition[:, :, index] - cond.condition[:, :, index]).abs().max() > 1e-3
    assert sampled.condition[:, :, 1:].abs().max() == 0


@pytest.mark.parametrize("kind", ["rgb", "scribble"])
def test_sparsectrl_scale_zero_is_unconditioned(kind, sparse_pipes, expected):
    pipe = sparse_pipes[kind]
    images, index = keyframes(expected, kind)
    plain = pipe("a cat", **FAST).frames
    off = pipe(
        "a cat", control_images=images[:, :, :1], control_frames=[0], control_scale=0.0, **FAST
    )
    assert torch.equal(off.frames, plain)
    on = pipe("a cat", control_images=images[:, :, :1], control_frames=[0], **FAST).frames
    moved = pipe("a cat", control_images=images[:, :, :1], control_frames=[5], **FAST).frames
    assert (on - plain).abs().max() > 1e-3
    assert (on - moved).abs().max() > 1e-3


def test_sparsectrl_accepts_pil_images_and_negative_indices(sparse_pipes, expected):
    pipe = sparse_pipes["scribble"]
    images, _ = keyframes(expected, "scribble")
    pil = [
        Image.fromarray((images[0, :, i].permute(1, 2, 0) * 255).round().byte().numpy())
        for i in range(2)
    ]
    quantised = (
        torch.stack([torch.from_numpy(np.array(p)).permute(2, 0, 1) for p in pil], dim=1).unsqueeze(
            0
        )
        / 255.0
    )
    a = pipe("a cat", control_images=pil, control_frames=[0, -1], **FAST).frames
    b = pipe("a cat", control_images=quantised, control_frames=[0, 7], **FAST).frames
    assert torch.equal(a, b)


def test_sparsectrl_with_context_windows(sparse_pipes, expected):
    pipe = sparse_pipes["rgb"]
    images, _ = keyframes(expected, "rgb")
    kwargs = dict(FAST, control_images=images, control_frames=[0])
    # N <= context_length: the plain pipeline, exactly.
    assert torch.equal(
        pipe("a cat", context_length=16, **kwargs).frames,
        pipe("a cat", context_length=None, **kwargs).frames,
    )
    long = dict(kwargs, num_frames=20, control_frames=[18], output_type="latents")
    windowed = pipe("a cat", context_length=8, context_overlap=2, **long)
    views = pipe("a cat", context_length=8, context_overlap=2, context_views=True, **long)
    whole = pipe("a cat", context_length=None, **long)
    assert windowed.shape == views.shape == whole.shape == (1, 4, 20, 8, 8)
    assert (windowed - whole).abs().max() > 1e-4  # windows see only their frames


def test_sparsectrl_file_missing_a_key_fails_clearly(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(REF_DIR / "base", subfolder="unet")
    raw = torch.load(REF_DIR / "sparsectrl_rgb.ckpt", map_location="cpu", weights_only=True)
    for missing in (
        "down_blocks.1.attentions.0.proj_in.weight",
        "down_blocks.2.motion_modules.1.temporal_transformer.proj_out.weight",
    ):
        sd = {k: v for k, v in raw["controlnet"].items() if k != missing}
        path = tmp_path / "broken.ckpt"
        torch.save({"controlnet": sd}, path)
        with pytest.raises(CheckpointError) as err:
            load_sparsectrl(path, unet)
        assert "broken.ckpt" in str(err.value) and missing in str(err.value)
    not_sparse = tmp_path / "motion.ckpt"
    torch.save({"controlnet": {"conv_in.weight": torch.zeros(1)}}, not_sparse)
    with pytest.raises(CheckpointError, match="not a SparseCtrl encoder"):
        load_sparsectrl(not_sparse, unet)
    with pytest.raises(CheckpointError, match="broken.ckpt"):
        AnimationPipeline.load(**{**pipeline_case_kwargs("v3_sparsectrl_rgb"), "sparsectrl": path})


def test_sparsectrl_loads_from_safetensors(tmp_path):
    unet = UNet2DConditionModel.from_pretrained(REF_DIR / "base", subfolder="unet")
    raw = torch.load(REF_DIR / "sparsectrl_scribble.ckpt", map_location="cpu", weights_only=True)
    save_state_dict(raw["controlnet"], tmp_path / "scribble.safetensors")
    a = load_sparsectrl(REF_DIR / "sparsectrl_scribble.ckpt", unet)
    b = load_sparsectrl(tmp_path / "scribble.safetensors", unet)
    assert not a.latent and a.condition_channels == 3
    for (k, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(x, y), k


# -- standard ControlNet --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def controlnet_dir(tmp_path_factory) -> Path:
    """A tiny diffusers ControlNet for the reference base, with random (not zero) outputs."""
    unet = UNet2DConditionModel.from_pretrained(REF_DIR / "base", subfolder="unet")
    torch.manual_seed(0)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    for name, p in model.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond")):
            torch.nn.init.normal_(p, std=0.05)
    folder = tmp_path_factory.mktemp("controlnet") / "tiny-controlnet"
    model.save_pretrained(folder)
    save_state_dict(model.state_dict(), folder.parent / "tiny-controlnet.safetensors")
    return folder


@pytest.fixture(scope="module")
def cn_pipe(controlnet_dir) -> AnimationPipeline:
    return AnimationPipeline.load(
        base=REF_DIR / "base",
        motion_module=REF_DIR / "mm_v3.ckpt",
        controlnets=[controlnet_dir, controlnet_dir.parent / "tiny-controlnet.safetensors"],
    )


def control_video(num_frames: int = 8, size: int = 64) -> torch.Tensor:
    """A white bar sweeping right over black, as uint8-exact values (PNG round trips)."""
    video = torch.zeros(1, 3, num_frames, size, size)
    for i in range(num_frames):
        x = 4 + i * (size - 16) // max(num_frames - 1, 1)
        video[:, :, i, 8:-8, x : x + 8] = 1.0
    return video


def test_controlnet_changes_output_and_scale_zero_does_not(cn_pipe):
    video = control_video()
    plain = cn_pipe("a cat", **FAST).frames
    both_off = cn_pipe("a cat", controlnet_images=[video, video], controlnet_scale=0.0, **FAST)
    assert torch.equal(both_off.frames, plain)
    first = cn_pipe("a cat", controlnet_images=[video, video], controlnet_scale=[1.0, 0.0], **FAST)
    second = cn_pipe("a cat", controlnet_images=[video, video], controlnet_scale=[0.0, 1.0], **FAST)
    both = cn_pipe("a cat", controlnet_images=[video, video], controlnet_scale=[1.0, 1.0], **FAST)
    assert (first.frames - plain).abs().max() > 1e-3
    # The folder and the single file are the same ControlNet.
    assert torch.equal(first.frames, second.frames)
    assert (both.frames - first.frames).abs().max() > 1e-4
    never = cn_pipe(
        "a cat", controlnet_images=[video, video], controlnet_start=0.5, controlnet_end=0.5, **FAST
    )
    assert torch.equal(never.frames, plain)
    late = cn_pipe(
        "a cat", controlnet_images=[video, video], controlnet_start=0.5, controlnet_end=1.0, **FAST
    )
    assert (late.frames - plain).abs().max() > 1e-4 and (
        late.frames - both.frames
    ).abs().max() > 1e-4


def test_controlnet_reads_a_video_folder_and_slices_windows(cn_pipe, tmp_path):
    video = control_video(num_frames=12)
    folder = tmp_path / "frames"
    folder.mkdir()
    for i in range(12):
        Image.fromarray((video[0, :, i].permute(1, 2, 0) * 255).byte().numpy()).save(
            folder / f"{i:03d}.png"
        )
    kwargs = dict(FAST, num_frames=12, controlnet_scale=[1.0, 0.0], output_type="latents")
    from_tensor = cn_pipe("a cat", controlnet_images=[video, video], **kwargs)
    from_folder = cn_pipe("a cat", controlnet_images=[folder, folder], **kwargs)
    assert torch.equal(from_tensor, from_folder)
    windows = cn_pipe(
        "a cat", controlnet_images=[folder, folder], context_length=8, context_overlap=4, **kwargs
    )
    assert windows.shape == from_tensor.shape and (windows - from_tensor).abs().max() > 1e-5
    with pytest.raises(ValueError, match="frames"):
        cn_pipe("a cat", controlnet_images=[video, video], **dict(kwargs, num_frames=16))


def test_single_file_controlnet_needs_known_keys(tmp_path):
    bad = tmp_path / "bad.safetensors"
    save_state_dict({"something.weight": torch.zeros(2)}, bad)
    unet = UNet2DConditionModel.from_pretrained(REF_DIR / "base", subfolder="unet")
    with pytest.raises(CheckpointError, match="not a ControlNet"):
        load_controlnet(bad, unet)


# -- img2vid and vid2vid --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe() -> AnimationPipeline:
    return AnimationPipeline.load(base=REF_DIR / "base", motion_module=REF_DIR / "mm_v3.ckpt")


def test_strength_zero_returns_the_input_and_one_ignores_it(pipe):
    video = control_video(num_frames=8) * 0.8 + 0.1
    kept = pipe("a cat", init_video=video, strength=0.0, output_type="latents", **FAST)
    assert torch.equal(kept, encode_frames(pipe.vae, video))
    frames = pipe("a cat", init_video=video, strength=0.0, **FAST).frames
    with torch.no_grad():
        round_trip = decode_latents(pipe.vae, encode_frames(pipe.vae, video))
    assert (frames - round_trip).abs().max() < 1e-4  # float noise of memory layouts
    text_only = pipe("a cat", **FAST).frames
    ignored = pipe("a cat", init_video=video, strength=1.0, **FAST).frames
    assert torch.equal(ignored, text_only)
    half = pipe("a cat", init_video=video, strength=0.5, **FAST).frames
    assert (half - text_only).abs().max() > 1e-3
    # Closer to the input than a generation that ignores it.
    assert (half - frames).abs().mean() < (text_only - frames).abs().mean()


def test_img2vid_repeats_the_image_over_frames(pipe):
    image = control_video(num_frames=1) * 0.5 + 0.25
    kept = pipe("a cat", init_image=image[:, :, 0], strength=0.0, output_type="latents", **FAST)
    one = encode_frames(pipe.vae, image)
    assert kept.shape == (1, 4, 8, 8, 8)
    assert torch.equal(kept, one.expand(-1, -1, 8, -1, -1))
    moved = pipe("a cat", init_image=image[:, :, 0], strength=0.6, **FAST).frames
    assert moved.shape == (1, 3, 8, 64, 64)
    with pytest.raises(ValueError, match="not both"):
        pipe("a cat", init_image=image[:, :, 0], init_video=image, **FAST)
    with pytest.raises(ValueError, match="strength"):
        pipe("a cat", init_image=image[:, :, 0], strength=1.5, **FAST)


def test_long_vid2vid_with_context_windows(pipe):
    video = control_video(num_frames=20)
    kwargs = dict(FAST, num_frames=None, context_length=8, context_overlap=2)
    kept = pipe("a cat", init_video=video, strength=0.0, output_type="latents", **kwargs)
    assert torch.equal(kept, encode_frames(pipe.vae, video))
    out = pipe("a cat", init_video=video, strength=0.7, scheduler="dpmpp_2m", **kwargs)
    assert out.frames.shape == (1, 3, 20, 64, 64)


# -- CLI and config (the README's examples, on the tiny reference models) --------------------------
def _save_png(frames: torch.Tensor, path: Path) -> Path:
    Image.fromarray((frames.permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
    return path


def test_cli_sparsectrl_controlnet_and_vid2vid(tmp_path, controlnet_dir, expected):
    key = _save_png(expected["sparsectrl.rgb.images"][0, :, 0], tmp_path / "first.png")
    model = ["--base", str(REF_DIR / "base"), "--motion-module", str(REF_DIR / "mm_v3.ckpt")]
    fast = ["--steps", "2", "--frames", "8", "--width", "64", "--height", "64", "--seed", "1"]
    assert 0 == main(
        ["generate", "a cat", *model, *fast, "--sparsectrl", str(REF_DIR / "sparsectrl_rgb.ckpt")]
        + ["--control-images", str(key), "--control-frames", "0", "-o", str(tmp_path / "s.gif")]
    )
    frames = tmp_path / "pose"
    frames.mkdir()
    for i in range(8):
        _save_png(control_video()[0, :, i], frames / f"{i:02d}.png")
    assert 0 == main(
        ["generate", "a cat", *model, *fast, "--controlnet", f"{controlnet_dir}:0.8"]
        + ["--controlnet-images", str(frames), "--controlnet-end", "0.5"]
        + ["-o", str(tmp_path / "c.gif")]
    )
    assert 0 == main(
        ["generate", "a cat", *model, "--steps", "2", "--width", "64", "--height", "64"]
        + [
            "--init-video",
            str(tmp_path / "c.gif"),
            "--strength",
            "0.6",
            "-o",
            str(tmp_path / "v.mp4"),
        ]
    )
    assert 0 == main(
        ["generate", "a cat", *model, *fast, "--init-image", str(key), "--strength", "0.5"]
        + ["-o", str(tmp_path / "i.gif")]
    )
    import json

    settings = json.loads((tmp_path / "s.gif.json").read_text())
    assert settings["control"]["control_frames"] == [0] and settings["models"]["sparsectrl"]
    assert json.loads((tmp_path / "v.mp4.json").read_text())["sampling"]["num_frames"] == 8
    assert json.loads((tmp_path / "i.gif.json").read_text())["init"]["strength"] == 0.5
    from animatediff.video import video_info

    assert video_info(tmp_path / "v.mp4").num_frames == 8


def test_official_sparsectrl_config_runs(tmp_path, expected):
    """An official v3 SparseCtrl prompt config (controlnet_path, controlnet_images,
    controlnet_image_indexs) reproduces the API's result."""
    images, _ = keyframes(expected, "scribble")
    index = [0, 7]
    paths = [
        str(_save_png(images[0, :, i], tmp_path / f"scribble{i}.png")) for i in range(len(index))
    ]
    entry = {
        "inference_config": "configs/inference/inference-v3.yaml",
        "motion_module": str(REF_DIR / "mm_v3.ckpt"),
        "adapter_lora_path": str(REF_DIR / "domain_adapter_v3.ckpt"),
        "adapter_lora_scale": 1.0,
        "controlnet_config": "configs/inference/sparsectrl/image_condition.yaml",
        "controlnet_path": str(REF_DIR / "sparsectrl_scribble.ckpt"),
        "controlnet_images": paths,
        "controlnet_image_indexs": index,
        "W": 64,
        "H": 64,
        "L": 8,
        "steps": 2,
        "guidance_scale": 7.5,
        "seed": [5],
        "prompt": ["a cat"],
        "n_prompt": [""],
    }
    config = tmp_path / "sparsectrl.yaml"
    config.write_text(yaml.safe_dump([entry]))
    out = tmp_path / "out"
    assert (
        main(["generate", "--config", str(config), "--base", str(REF_DIR / "base"), "-o", str(out)])
        == 0
    )
    (gif,) = (g for g in out.glob("*.gif") if g.name != "sample.gif")  # sample.gif: the grid
    from animatediff.video import read_video

    api = AnimationPipeline.load(**pipeline_case_kwargs("v3_sparsectrl_scribble"))
    quantised = (
        torch.stack(
            [torch.from_numpy(np.array(Image.open(p))).permute(2, 0, 1) for p in paths], dim=1
        ).unsqueeze(0)
        / 255.0
    )
    video = api(
        "a cat",
        num_frames=8,
        height=64,
        width=64,
        num_inference_steps=2,
        seed=5,
        progress=False,
        control_images=quantised,
        control_frames=index,
    )
    written = read_video(gif)
    assert written.shape == (3, 8, 64, 64)
    # GIF quantises colours; the same computation lands within a few levels.
    assert (written - video.frames[0]).abs().mean() < 0.03


def test_config_controlnets_and_init_video(tmp_path, controlnet_dir):
    """This project's config keys: controlnets [{path, images, scale, end}], init_video,
    strength (paths relative to the config's folder), as in the README."""
    import shutil

    shutil.copytree(controlnet_dir, tmp_path / "cn")
    frames = tmp_path / "pose"
    frames.mkdir()
    video = control_video()
    for i in range(8):
        _save_png(video[0, :, i], frames / f"{i:02d}.png")
    entry = {
        "motion_module": str(REF_DIR / "mm_v3.ckpt"),
        "controlnets": [{"path": "cn", "images": "pose", "scale": 1.0, "end": 0.8}],
        "init_video": "pose",
        "strength": 0.6,
        "W": 64,
        "H": 64,
        "steps": 2,
        "seed": 2,
        "prompt": ["a dancer, oil painting"],
    }
    config = tmp_path / "control.yaml"
    config.write_text(yaml.safe_dump([entry]))
    out = tmp_path / "out"
    args = ["generate", "--config", str(config), "--base", str(REF_DIR / "base"), "-o", str(out)]
    assert main(args) == 0
    (settings,) = out.glob("*.json")
    import json

    info = json.loads(settings.read_text())
    assert info["sampling"]["num_frames"] == 8  # the init video's length
    assert info["init"]["strength"] == 0.6
    assert info["models"]["controlnets"] == [str(tmp_path / "cn")]
    bad = dict(entry, controlnet_images=["pose"])
    config.write_text(yaml.safe_dump([bad]))
    assert main(args + ["--overwrite"]) != 0  # the official key needs controlnet_path
