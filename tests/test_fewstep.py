"""Few-step motion modules as released: AnimateDiff-Lightning in both layouts, AnimateLCM (motion
module, image LoRA, the I2V variant refused), how each is recognised, the sampler presets, and
the single UNet batch at guidance <= 1.

References: the official AnimateDiff v2 output for the tiny v2 weights (`expected.safetensors`;
Lightning and AnimateLCM are v2 modules), diffusers' own `MotionAdapter` (which writes and reads
the Lightning diffusers layout), diffusers' own kohya-LoRA loading, the official AnimateLCM merge
rule written out here, and diffusers schedulers built as the model cards build them.
"""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch
from diffusers import (
    EulerDiscreteScheduler,
    LCMScheduler,
    MotionAdapter,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from animatediff import AnimationPipeline, MotionUNet
from animatediff.checkpoints.adapters import apply_image_lora
from animatediff.checkpoints.base import load_base
from animatediff.checkpoints.detect import describe
from animatediff.checkpoints.fewstep import lora_release, motion_release
from animatediff.checkpoints.io import CheckpointError
from animatediff.checkpoints.kinds import check_kind
from animatediff.checkpoints.motion import (
    build_motion_module,
    read_motion_checkpoint,
    save_motion_module,
)
from animatediff.cli.main import main as cli_main
from animatediff.pipeline.presets import PRESETS, detect_preset, preset_settings
from animatediff.pipeline.schedulers import make_scheduler

# runwayml/stable-diffusion-v1-5 scheduler/scheduler_config.json: the config the model cards'
# `from_config(pipe.scheduler.config, ...)` starts from (their bases are SD1.5 fine-tunes).
SD15_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}
TINY_ADAPTER = dict(  # diffusers MotionAdapter shaped like the tiny reference UNet's modules
    block_out_channels=(32, 64, 64, 64),
    motion_layers_per_block=2,
    use_motion_mid_block=True,
    motion_num_attention_heads=8,
    motion_norm_num_groups=32,
    motion_max_seq_length=32,
)
# LCM-LoRA's targets (the LCM distillation scripts), which AnimateLCM's LoRA covers
LCM_LORA_TARGETS = (
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "proj_in",
    "proj_out",
    "ff.net.0.proj",
    "ff.net.2",
    "conv1",
    "conv2",
    "conv_shortcut",
    "downsamplers.0.conv",
    "upsamplers.0.conv",
    "time_emb_proj",
)


def rel_err(actual: torch.Tensor, reference: torch.Tensor) -> float:
    reference = reference.double()
    return ((actual.double() - reference).abs().max() / reference.abs().max()).item()


def to_diffusers_key(key: str) -> str:
    """Released motion-module name -> diffusers MotionAdapter name (written out here)."""
    key = key.replace(".temporal_transformer.", ".")
    for old, new in (
        (".norms.0.", ".norm1."),
        (".norms.1.", ".norm2."),
        (".ff_norm.", ".norm3."),
        (".attention_blocks.0.", ".attn1."),
        (".attention_blocks.1.", ".attn2."),
    ):
        key = key.replace(old, new)
    return key


@pytest.fixture(scope="module")
def v2_raw(ref_dir) -> dict[str, torch.Tensor]:
    """The tiny v2 module as the official code reads it (pe buffers included)."""
    return torch.load(ref_dir / "mm_v2.ckpt", map_location="cpu", weights_only=True)


@pytest.fixture(scope="module")
def unet2d(ref_dir) -> UNet2DConditionModel:
    return UNet2DConditionModel.from_pretrained(ref_dir / "base", subfolder="unet").eval()


@torch.no_grad()
def noise_prediction(unet2d, ckpt, expected) -> torch.Tensor:
    model = MotionUNet(unet2d, build_motion_module(ckpt))
    try:
        sample, t = expected["unet.sample"], expected["unet.timestep"]
        return model(sample, t, expected["unet.encoder_hidden_states"])
    finally:
        model.remove()


@pytest.fixture(scope="module")
def lightning_files(tmp_path_factory, v2_raw) -> dict[str, Path]:
    """The tiny v2 weights as `animatediff_lightning_4step_{diffusers,comfyui}.safetensors`."""
    folder = tmp_path_factory.mktemp("lightning")
    adapter = MotionAdapter(**TINY_ADAPTER)
    weights = {to_diffusers_key(k): v for k, v in v2_raw.items() if not k.endswith(".pe")}
    missing, unexpected = adapter.load_state_dict(weights, strict=False)
    assert unexpected == [] and all(k.endswith(".pos_embed.pe") for k in missing)
    # as the diffusers file is consumed: `MotionAdapter().load_state_dict(load_file(...))`
    diffusers_file = folder / "animatediff_lightning_4step_diffusers.safetensors"
    safetensors.torch.save_file(adapter.state_dict(), diffusers_file)
    MotionAdapter(**TINY_ADAPTER).load_state_dict(safetensors.torch.load_file(diffusers_file))
    comfyui_file = folder / "animatediff_lightning_4step_comfyui.safetensors"
    safetensors.torch.save_file(v2_raw, comfyui_file)
    for file in (diffusers_file, comfyui_file):  # the command line's header check takes both
        check_kind(file, "motion_module")
    return {"diffusers": diffusers_file, "comfyui": comfyui_file}


def pe_less(v2_raw) -> dict[str, torch.Tensor]:
    return {k: v for k, v in v2_raw.items() if not k.endswith(".pe")}


# ------------------------------------------------------------------------- AnimateDiff-Lightning


def test_lightning_layouts_load_and_give_the_same_numbers(lightning_files, unet2d, expected):
    ckpts = {layout: read_motion_checkpoint(p) for layout, p in lightning_files.items()}
    assert ckpts["diffusers"].layout == "diffusers" and ckpts["comfyui"].layout == "original"
    for ckpt in ckpts.values():
        assert ckpt.release.name == "AnimateDiff-Lightning 4-step"
        assert (ckpt.release.preset, ckpt.release.steps) == ("lightning", 4)
        assert ckpt.config.version == "v2" and ckpt.config.mid_block  # distilled from v2
        assert not ckpt.config.groupnorm_across_frames and ckpt.stored_pe_length == 32
    assert ckpts["diffusers"].config == ckpts["comfyui"].config
    a, b = ckpts["diffusers"].state_dict, ckpts["comfyui"].state_dict
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    out = {layout: noise_prediction(unet2d, c, expected) for layout, c in ckpts.items()}
    assert torch.equal(out["diffusers"], out["comfyui"])
    assert rel_err(out["comfyui"], expected["unet.out.v2"]) < 1e-5  # the official v2 result


def test_lightning_release_survives_conversion(lightning_files, tmp_path):
    ckpt = read_motion_checkpoint(lightning_files["diffusers"])
    renamed = save_motion_module(ckpt, tmp_path / "motion.safetensors")
    again = read_motion_checkpoint(renamed)
    assert (again.release.name, again.release.steps) == ("AnimateDiff-Lightning 4-step", 4)
    assert again.release.source == "metadata"
    assert detect_preset(renamed) == "lightning"  # from the metadata, without loading weights
    folder = save_motion_module(ckpt, tmp_path / "as_diffusers", layout="diffusers")
    assert read_motion_checkpoint(folder).release.name == "AnimateDiff-Lightning 4-step"


# ------------------------------------------------------------------------------------ AnimateLCM


def test_animatelcm_module_loads_as_released(v2_raw, unet2d, expected, tmp_path):
    """A v2-shaped pickle without `pos_encoder` buffers, computed like v2 (per-frame GroupNorm,
    `use_inflated_groupnorm: true` in AnimateLCM's inference-t2v.yaml)."""
    path = tmp_path / "AnimateLCM_sd15_t2v.ckpt"
    torch.save(pe_less(v2_raw), path)
    ckpt = read_motion_checkpoint(path)
    assert (ckpt.release.name, ckpt.release.preset) == ("AnimateLCM t2v", "animatelcm")
    assert ckpt.release.source == "file name"
    c = ckpt.config
    assert (c.version, c.mid_block, c.groupnorm_across_frames) == ("v2", True, False)
    assert ckpt.stored_pe_length is None and c.max_frames == 64  # AnimateLCM's encoding length
    assert rel_err(noise_prediction(unet2d, ckpt, expected), expected["unet.out.v2"]) < 1e-5

    # renamed: the missing buffers in a pickle still point to AnimateLCM, flagged as a guess
    torch.save(pe_less(v2_raw), tmp_path / "motion.ckpt")
    guessed = read_motion_checkpoint(tmp_path / "motion.ckpt").release
    assert guessed.name == "AnimateLCM t2v" and "guessed" in guessed.source
    # a safetensors repack without buffers says nothing (repacks often drop them)
    safetensors.torch.save_file(pe_less(v2_raw), tmp_path / "repack.safetensors")
    assert read_motion_checkpoint(tmp_path / "repack.safetensors").release is None


def test_plain_v2_is_not_a_fewstep_release(ref_dir):
    assert read_motion_checkpoint(ref_dir / "mm_v2.ckpt").release is None
    assert detect_preset(ref_dir / "mm_v2.ckpt") is None
    assert "release" not in describe(ref_dir / "mm_v2.ckpt")


def test_animatelcm_i2v_is_refused_clearly(v2_raw, tmp_path):
    sd = pe_less(v2_raw)
    g = torch.Generator().manual_seed(0)
    sd["img_encoder.conv_in.weight"] = torch.randn(32, 4, 3, 3, generator=g)
    sd["img_encoder.body.0.block1.weight"] = torch.randn(32, 32, 3, 3, generator=g)
    path = tmp_path / "AnimateLCM_sd15_i2v.ckpt"
    torch.save(sd, path)
    with pytest.raises(CheckpointError, match=r"AnimateLCM-I2V.*not supported") as err:
        read_motion_checkpoint(path)
    assert str(path) in str(err.value) and "img_encoder" in str(err.value)
    info = describe(path)  # `inspect` still names it
    assert info["release"] == "AnimateLCM i2v" and info["supported"] is False


def kohya_lcm_lora(unet: torch.nn.Module, rank: int = 8) -> dict[str, torch.Tensor]:
    """A kohya-format LoRA on LCM-LoRA's targets, alpha / rank = 1/8 as LCM-LoRA's 8 / 64."""
    g = torch.Generator().manual_seed(3)
    sd = {}
    for name, module in unet.named_modules():
        if not name.endswith(LCM_LORA_TARGETS):
            continue
        out_ch, in_ch, *kernel = module.weight.shape  # Linear, or Conv2d (kernel 1 or 3)
        key = "lora_unet_" + name.replace(".", "_")
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, in_ch, *kernel, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(out_ch, rank, *[1] * len(kernel), generator=g)
        sd[f"{key}.alpha"] = torch.tensor(rank / 8)
    return {k: v.half() for k, v in sd.items()}  # released in fp16


def kohya_name(state_dict_key: str) -> str:
    """`down_blocks.0.resnets.0.conv1.weight` -> `down_blocks_0_resnets_0_conv1`."""
    return state_dict_key.removesuffix(".weight").replace(".", "_")


LORA_STRENGTH = 0.8  # the AnimateLCM model card's
LORA_INPUTS = (torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(1)), 500)


@pytest.fixture(scope="module")
def animatelcm_lora(ref_dir, tmp_path_factory) -> dict:
    """The LoRA file, and the base UNet's weights and output before and after merging it."""
    image = load_base(ref_dir / "base")
    text = torch.randn(2, 77, 32, generator=torch.Generator().manual_seed(2))
    before = {k: v.clone() for k, v in image.unet.state_dict().items()}
    text_encoder_before = {k: v.clone() for k, v in image.text_encoder.state_dict().items()}
    with torch.no_grad():
        plain = image.unet(*LORA_INPUTS, text).sample
    lora = kohya_lcm_lora(image.unet)
    path = tmp_path_factory.mktemp("animatelcm") / "AnimateLCM_sd15_t2v_lora.safetensors"
    safetensors.torch.save_file(lora, path)
    check_kind(path, "lora")
    apply_image_lora(image, path, LORA_STRENGTH, "kohya")
    with torch.no_grad():
        merged = image.unet(*LORA_INPUTS, text).sample
    text_encoder_unchanged = all(
        torch.equal(v, text_encoder_before[k]) for k, v in image.text_encoder.state_dict().items()
    )
    return dict(
        path=path,
        lora=lora,
        before=before,
        after=image.unet.state_dict(),
        text=text,
        plain=plain,
        merged=merged,
        text_encoder_unchanged=text_encoder_unchanged,
    )


def test_animatelcm_lora_is_recognised(animatelcm_lora):
    info = describe(animatelcm_lora["path"])
    assert info["kind"] == "image LoRA (kohya)" and info["release"] == "AnimateLCM LoRA"
    assert info["preset"] == "animatelcm" and PRESETS["animatelcm"].lora_strength == LORA_STRENGTH


def test_animatelcm_lora_merges_as_the_official_code(animatelcm_lora):
    lora, before, after = (animatelcm_lora[k] for k in ("lora", "before", "after"))
    targets = {k[len("lora_unet_") : -len(".alpha")] for k in lora if k.endswith(".alpha")}
    changed = {kohya_name(k) for k in after if not torch.equal(after[k], before[k])}
    assert changed == targets and len(targets) > 40  # every target, nothing else
    for key in after:  # AnimateLCM's convert_lcm_lora: W += 1/8 * strength * up @ down
        if kohya_name(key) in targets:
            up = lora[f"lora_unet_{kohya_name(key)}.lora_up.weight"].float().flatten(1)
            down = lora[f"lora_unet_{kohya_name(key)}.lora_down.weight"].float().flatten(1)
            want = before[key] + (LORA_STRENGTH / 8 * up @ down).reshape(before[key].shape)
            assert torch.allclose(after[key], want, rtol=1e-5, atol=1e-6), key
    assert animatelcm_lora["text_encoder_unchanged"]  # a UNet-only LoRA


def test_animatelcm_lora_merges_as_diffusers_loads_it(animatelcm_lora, ref_dir):
    pytest.importorskip("peft", reason="diffusers loads LoRAs through peft")
    path = animatelcm_lora["path"]
    pipe = StableDiffusionPipeline.from_pretrained(
        ref_dir / "base", safety_checker=None, requires_safety_checker=False
    )
    pipe.load_lora_weights(path.parent, weight_name=path.name, adapter_name="lcm-lora")
    pipe.set_adapters(["lcm-lora"], [LORA_STRENGTH])  # as the AnimateLCM model card does
    with torch.no_grad():
        theirs = pipe.unet(*LORA_INPUTS, animatelcm_lora["text"]).sample
    assert rel_err(animatelcm_lora["merged"], theirs) < 1e-5
    assert rel_err(animatelcm_lora["plain"], theirs) > 1e-2  # the LoRA does change the output


# ----------------------------------------------------------------------------------- recognition

NAMES = [
    *[
        (
            f"animatediff_lightning_{n}step_{layout}.safetensors",
            f"AnimateDiff-Lightning {n}-step",
            "lightning",
            n,
        )
        for n in (1, 2, 4, 8)
        for layout in ("diffusers", "comfyui")
    ],
    ("AnimateLCM_sd15_t2v.ckpt", "AnimateLCM t2v", "animatelcm", None),
    ("sd15_t2v_beta.ckpt", "AnimateLCM t2v", "animatelcm", None),  # its first release name
    ("animatediffLCMMotion_v10.ckpt", "AnimateLCM t2v", "animatelcm", None),  # civitai's
    (
        "models--wangfuyun--AnimateLCM/snapshots/0123abc/diffusion_pytorch_model.safetensors",
        "AnimateLCM t2v",
        "animatelcm",
        None,
    ),
    ("mm_sd_v15_v2.ckpt", None, None, None),
    ("v3_sd15_mm.ckpt", None, None, None),
]


@pytest.mark.parametrize("name, release, preset, steps", NAMES)
def test_motion_module_names(name, release, preset, steps):
    found = motion_release(name, {})
    got = (found.name, found.preset, found.steps) if found else (None, None, None)
    assert got == (release, preset, steps)
    assert detect_preset(name) == preset
    if preset == "lightning":
        assert preset_settings("auto", name)["num_inference_steps"] == steps


@pytest.mark.parametrize(
    "name, release",
    [
        ("AnimateLCM_sd15_t2v_lora.safetensors", "AnimateLCM LoRA"),
        ("sd15_lora_beta.safetensors", "AnimateLCM LoRA"),
        ("AnimateLCM_sd15_i2v_lora.safetensors", "AnimateLCM i2v LoRA"),
        ("lcm-lora-sdv1-5.safetensors", None),  # LCM-LoRA for images: not AnimateLCM's
        ("style.safetensors", None),
    ],
)
def test_lora_names(name, release):
    found = lora_release(name, {})
    assert (found.name if found else None) == release
    assert detect_preset(name) == ("animatelcm" if release == "AnimateLCM LoRA" else None)


def test_inspect_names_release_and_sampler(lightning_files, v2_raw, tmp_path, capsys):
    assert cli_main(["inspect", str(lightning_files["comfyui"])]) == 0
    text = capsys.readouterr().out
    assert re.search(r"^release\s+AnimateDiff-Lightning 4-step$", text, re.M), text
    assert re.search(r"^preset\s+lightning$", text, re.M), text
    assert re.search(r"^sampler\s+Euler, trailing timestep spacing, linear betas", text, re.M)
    path = tmp_path / "AnimateLCM_sd15_t2v.ckpt"
    torch.save(pe_less(v2_raw), path)
    info = describe(path)
    assert info["release"] == "AnimateLCM t2v" and info["max_frames"] == 64
    # the sampler text states the preset's own numbers
    lcm = PRESETS["animatelcm"]
    assert f"{lcm.num_inference_steps} steps" in info["sampler"]
    assert f"guidance {lcm.guidance_scale:g}" in info["sampler"]
    assert f"{lcm.lora_strength:g}" in info["sampler"]
    lightning = describe(lightning_files["diffusers"])
    assert f"guidance {PRESETS['lightning'].guidance_scale:g}" in lightning["sampler"]


# -------------------------------------------------------------------------------------- presets


def behaviour(scheduler) -> dict:
    """The scheduler's configuration as its class reads it (extra keys a config carried along
    from another scheduler class, like PNDM's `skip_prk_steps`, are ignored by it)."""
    params = inspect.signature(type(scheduler).__init__).parameters
    return {k: v for k, v in scheduler.config.items() if k in params}


@pytest.mark.parametrize("steps", [1, 2, 4, 8])
def test_lightning_preset_is_the_cards_scheduler(steps):
    name = f"animatediff_lightning_{steps}step_diffusers.safetensors"
    settings = preset_settings("lightning", name)
    assert settings["num_inference_steps"] == steps and settings["guidance_scale"] == 1.0
    ours = make_scheduler(settings["scheduler"], **settings["scheduler_config"])
    card = EulerDiscreteScheduler.from_config(
        SD15_SCHEDULER, timestep_spacing="trailing", beta_schedule="linear"
    )
    assert type(ours) is type(card) and behaviour(ours) == behaviour(card)
    ours.set_timesteps(steps)
    card.set_timesteps(steps)
    assert torch.equal(ours.timesteps, card.timesteps) and torch.equal(ours.sigmas, card.sigmas)
    assert ours.timesteps[0] == 999  # trailing: the first step starts from pure noise
    assert ours.init_noise_sigma == card.init_noise_sigma


@pytest.mark.parametrize("steps", [4, 5, 6, 8])
def test_animatelcm_preset_is_the_cards_scheduler(steps):
    settings = preset_settings("animatelcm", {"preset": "animatelcm"})
    assert settings["num_inference_steps"] == 6 and settings["guidance_scale"] == 2.0
    assert settings["lora_strength"] == 0.8
    ours = make_scheduler(settings["scheduler"], **settings["scheduler_config"])
    card = LCMScheduler.from_config(SD15_SCHEDULER, beta_schedule="linear")
    assert type(ours) is type(card) and behaviour(ours) == behaviour(card)
    ours.set_timesteps(steps)
    card.set_timesteps(steps)
    assert torch.equal(ours.timesteps, card.timesteps)
    assert torch.equal(ours.alphas_cumprod, card.alphas_cumprod)
    # and one LCM step, with the same noise, lands on the same sample
    g = torch.Generator().manual_seed(0)
    sample, model_out = torch.randn(1, 4, 8, 8, generator=g), torch.randn(1, 4, 8, 8, generator=g)
    t = ours.timesteps[0]
    a = ours.step(model_out, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    b = card.step(model_out, t, sample, generator=torch.Generator().manual_seed(1)).prev_sample
    assert torch.equal(a, b)


def test_explicit_values_win_over_a_preset():
    two_step = "animatediff_lightning_2step_comfyui.safetensors"
    # the card: "3 inference steps on the 2-step model produces great results"
    s = preset_settings("lightning", two_step, num_inference_steps=3, guidance_scale=None)
    assert (s["num_inference_steps"], s["guidance_scale"]) == (3, 1.0)
    s = preset_settings("lightning", two_step, guidance_scale=1.5)
    assert (s["num_inference_steps"], s["guidance_scale"]) == (2, 1.5)
    s = preset_settings("lightning", None, scheduler_config={"timestep_spacing": "linspace"})
    assert s["scheduler_config"] == {"timestep_spacing": "linspace"}
    assert s["num_inference_steps"] == 4  # the card's example when the file does not say
    s = preset_settings("lightning", two_step, scheduler="ddim")
    assert (s["scheduler"], s["scheduler_config"]) == ("ddim", {})  # trailing was for Euler
    s = preset_settings("animatelcm", None, scheduler_config={"original_inference_steps": 100})
    assert s["scheduler_config"] == {"set_alpha_to_one": False, "original_inference_steps": 100}
    assert preset_settings("animatelcm", None, lora_strength=1.0)["lora_strength"] == 1.0
    # auto: what was loaded decides; nothing recognised leaves only what was given
    assert preset_settings("auto", two_step)["num_inference_steps"] == 2
    assert preset_settings("auto", "mm_sd_v15_v2.ckpt") == {}
    assert preset_settings("auto", None, guidance_scale=3.0) == {"guidance_scale": 3.0}
    with pytest.raises(ValueError, match="turbo"):
        preset_settings("turbo")
    with pytest.raises(ValueError, match="steps"):
        preset_settings("lightning", None, steps=4)
    with pytest.raises(ValueError, match="no option 'timestep_spacing_x'"):
        make_scheduler("euler", timestep_spacing_x="trailing")


# ------------------------------------------------------------------------ one batch at cfg <= 1


@pytest.fixture(scope="module")
def pipe(ref_dir) -> AnimationPipeline:
    return AnimationPipeline.load(base=ref_dir / "base", motion_module=ref_dir / "mm_v2.ckpt")


@pytest.mark.parametrize("guidance, passes", [(1.0, 1), (7.5, 2)])
def test_guidance_one_runs_one_unet_batch(pipe, guidance, passes):
    settings = preset_settings("lightning", {"preset": "lightning", "steps": 2})
    batches: list[int] = []
    # the 2D UNet's first layer sees frames folded into the batch
    handle = pipe.unet.unet.conv_in.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0])
    )
    scheduler = pipe.scheduler
    pipe.scheduler = make_scheduler(settings["scheduler"], **settings["scheduler_config"])
    try:
        pipe(
            "a red circle",
            num_frames=3,
            height=64,
            width=64,
            num_inference_steps=settings["num_inference_steps"],
            guidance_scale=guidance,
            seed=0,
            output_type="latents",
            progress=False,
        )
    finally:
        handle.remove()
        pipe.scheduler = scheduler
    # 1 video x 3 frames, twice that with the unconditional pass
    assert batches == [3 * passes] * 2
