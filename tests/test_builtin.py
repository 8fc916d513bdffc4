"""The built-in models (the miniature world): shipped in the package, loaded offline through the
public API, and generating clips that hold up against the shipped evaluation's own numbers.

Thresholds come from `builtin/data/evaluation.json` (written by `animatediff evaluate` on these
models): a handful of clips generated here must land between the frame-by-frame baseline and the
evaluated motion model, not at the level of noise.
"""

from __future__ import annotations

import json

import pytest

from animatediff import AnimationPipeline, builtin
from animatediff.builtin.model import builtin_model
from animatediff.world import evaluate_settings, metrics
from animatediff.world.evaluate import lora_rank

EVALUATION = builtin.PACKAGE_DATA / "evaluation.json"
pytestmark = pytest.mark.skipif(
    not EVALUATION.exists(), reason="the built-in models are not installed in this tree"
)


@pytest.fixture(scope="module")
def results() -> dict:
    return json.loads(EVALUATION.read_text())


@pytest.fixture(scope="module")
def pipe() -> AnimationPipeline:
    return AnimationPipeline.load()


def settings(results) -> dict:
    s = results["settings"]
    return dict(
        num_frames=s["num_frames"],
        height=s["height"],
        width=s["width"],
        num_inference_steps=s["steps"],
        guidance_scale=s["guidance_scale"],
        progress=False,
    )


def test_builtin_models_are_trained_small_and_named():
    model = builtin_model()
    assert model.trained
    files = [f for f in builtin.PACKAGE_DATA.rglob("*") if f.is_file()]
    assert sum(f.stat().st_size for f in files) <= 25 * 2**20
    names = builtin.manifest()
    assert {"stripes", "outline", "outline-lora"} <= set(names["personal"])
    assert {"zoom-in", "pan-left"} <= set(names["motion_loras"])


@pytest.mark.slow  # loads and runs every shipped extra
def test_every_builtin_extra_loads_through_the_public_api(results):
    """Personal checkpoints (single-file LDM), the kohya LoRA, the adapter and MotionLoRAs go
    through the same loaders as users' files, and change the result."""
    kwargs = dict(settings(results), num_frames=4, num_inference_steps=2, seed=0)
    plain = AnimationPipeline.load()
    reference = plain("a red circle on a blue background", **kwargs).frames
    for name in builtin.manifest()["personal"]:
        kind, path = builtin.personal(name)
        load = {"personal": path} if kind == "checkpoint" else {"loras": [(path, 1.0)]}
        styled = AnimationPipeline.load(**load)("a red circle on a blue background", **kwargs)
        assert (styled.frames - reference).abs().max() > 1e-3, name
    with_adapter = AnimationPipeline.load(adapter=(builtin.adapter(), 1.0))
    assert (
        with_adapter("a red circle on a blue background", **kwargs).frames - reference
    ).abs().max() > 1e-3
    for name in builtin.manifest()["motion_loras"]:
        plain.add_motion_lora(builtin.motion_lora(name), 1.0, name=name)
        moved = plain("a red circle on a blue background", **kwargs).frames
        plain.remove_motion_lora(name)
        assert (moved - reference).abs().max() > 1e-3, name


@pytest.mark.slow  # 4 clips x 2 at the evaluation's settings
def test_clips_pass_thresholds_from_the_evaluation(pipe, results):
    """Fresh clips (seed 1; the evaluation used seed 0), generated as the evaluation does,
    against what it measured: the motion module keeps frames more consistent than the same
    model frame by frame (same noise), and colours follow the text about as often."""
    prompts = list(evaluate_settings.PROMPTS[:4])
    kwargs = dict(settings(results), seed=1)

    def clips(motion_scale: float) -> list:
        frames = pipe(prompts, motion_scale=motion_scale, **kwargs).frames
        return [clip.permute(1, 2, 3, 0).numpy() for clip in frames]

    animated = metrics.clip_metrics(clips(1.0), prompts)
    frame_by_frame = metrics.clip_metrics(clips(0.0), prompts)
    main = results["main"]
    baseline = results["baselines"]["frame_by_frame"]["base"]
    assert main["temporal_consistency"] > baseline["temporal_consistency"]  # what was measured
    assert animated["temporal_consistency"] > frame_by_frame["temporal_consistency"], (
        animated,
        frame_by_frame,
    )
    # Colour alignment over 4 clips: within one clip of the evaluated share, and above chance
    # (six object colours).
    assert animated["colour_alignment"] >= main["colour_alignment"] - 0.25 - 1e-9, animated
    assert animated["colour_alignment"] > 1 / 6
    assert animated["dynamic_degree"] >= 0.5 * main["dynamic_degree"]


@pytest.mark.slow  # 4 clips at the evaluation's settings
@pytest.mark.parametrize("kind", ["zoom-in", "pan-left"])
def test_motion_lora_moves_its_way(pipe, results, kind):
    """The MotionLoRA's effect the evaluation measured shows on fresh clips (seeds 1 and 2), same
    noise at strength 1 and 0: zoom-in grows the object's area more at 1 than at 0 (and above 1);
    pan-left moves its centroid left at 1, and further left than at 0."""
    assert results["motion_loras"][kind]["effect"]
    prompts = list(evaluate_settings.CAMERA_PROMPTS[kind])
    pipe.add_motion_lora(builtin.motion_lora(kind), 1.0, name=kind)
    try:
        measured = {}
        for strength in (1.0, 0.0):
            pipe.set_motion_lora_strength(kind, strength)
            clips = []
            for seed in (1, 2):
                frames = pipe(prompts, seed=seed, **settings(results)).frames
                clips += [clip.permute(1, 2, 3, 0).numpy() for clip in frames]
            measured[strength] = metrics.camera_motion(clips, prompts * 2)
    finally:
        pipe.remove_motion_lora(kind)
    assert metrics.camera_effect(kind, measured[1.0], measured[0.0]), measured


@pytest.mark.slow  # what the shipped weights learnt: clips at the evaluation's settings
def test_pan_left_motion_lora_learnt_its_direction(pipe):
    """On fresh rendered pan-left clips, the MotionLoRA predicts the noise better on the clip as
    made than played backwards (at low and middle noise), and by far more than strength 0 does."""
    from animatediff.world.direction import direction_losses, encode_clips

    latents, captions = encode_clips(pipe, "pan-left", clips=4, seed=2000)
    pipe.add_motion_lora(builtin.motion_lora("pan-left"), 1.0, name="pan-left")
    try:
        ratio = {}
        for strength in (1.0, 0.0):
            pipe.set_motion_lora_strength("pan-left", strength)
            losses = direction_losses(pipe, latents, captions, timesteps=(100, 300))
            ratio[strength] = [b / f for f, b in zip(losses["forward"], losses["backward"])]
    finally:
        pipe.remove_motion_lora("pan-left")
    assert ratio[1.0][0] > 1.1 and ratio[1.0][1] > 1.1, ratio
    assert all(on - 1 > 3 * abs(off - 1) for on, off in zip(ratio[1.0], ratio[0.0])), ratio


@pytest.mark.slow  # what the shipped weights learnt: clips at the evaluation's settings
def test_motion_module_draws_on_the_other_frames(pipe):
    """Mixing frames across clips costs the built-in motion module a higher denoising loss at low
    and middle noise; with the module switched off, frames are denoised alone and the loss is
    the same however they are arranged: exactly for a module trained on independent noise, in
    expectation for one with a shared-noise prior (the noise common to a clip stays with it)."""
    from animatediff.world.direction import coherence_losses, encode_clips

    latents, _ = encode_clips(pipe, "static", clips=4, seed=3000)
    ratio = {}
    for scale in (1.0, 0.0):
        losses = coherence_losses(pipe, latents, timesteps=(100, 500), motion_scale=scale)
        ratio[scale] = [m / c for c, m in zip(losses["clips"], losses["mixed"])]
    assert min(ratio[1.0]) > 1.1, ratio
    assert all(on - 1 > 3 * abs(off - 1) for on, off in zip(ratio[1.0], ratio[0.0])), ratio
    if pipe.unet.config.shared_noise == 0:
        assert all(abs(r - 1) < 1e-3 for r in ratio[0.0]), ratio


@pytest.mark.slow  # clips of two models at the evaluation's settings
def test_image_layer_baseline_absorbs_the_web_look(pipe, results):
    """The ablation the paper argues against: a motion module trained with the image layers
    fine-tuned too (shipped in `baseline/`) lets the training videos' watermark into the image
    model, as the evaluation measured; the shipped model, whose image layers stayed frozen,
    does not show it (fresh clips, seed 2)."""
    from diffusers import UNet2DConditionModel

    measured = results["baselines"]["image_layers"]["base"]
    assert measured["watermark_rate"] > results["main"]["watermark_rate"]
    unet_folder, motion_module = builtin.baseline()
    baseline = AnimationPipeline.load(motion_module=motion_module)
    baseline.unet.unet.load_state_dict(
        UNet2DConditionModel.from_pretrained(unet_folder).state_dict()
    )
    prompts = list(evaluate_settings.PROMPTS[:4])
    rates = {}
    for name, p in (("baseline", baseline), ("shipped", pipe)):
        frames = p(prompts, seed=2, **settings(results)).frames
        clips = [clip.permute(1, 2, 3, 0).numpy() for clip in frames]
        rates[name] = metrics.clip_metrics(clips, prompts)["watermark_rate"]
    assert rates["baseline"] > 0.05 and rates["baseline"] > rates["shipped"], rates


def test_motion_lora_rank_and_clip_study_was_measured(results):
    """The shipped study MotionLoRAs (rank 2; 10 clips) were evaluated beside the rank-8,
    30-clip one, each with its rank and clip count read from the files / manifest."""
    rows = results["motion_loras"]
    assert (rows["zoom-in"]["rank"], rows["zoom-in"]["clips"]) == (8, 30)
    assert (rows["zoom-in-rank2"]["rank"], rows["zoom-in-rank2"]["clips"]) == (2, 30)
    assert (rows["zoom-in-clips10"]["rank"], rows["zoom-in-clips10"]["clips"]) == (8, 10)
    for name in ("zoom-in-rank2", "zoom-in-clips10"):
        assert lora_rank(builtin.motion_lora(name)) == rows[name]["rank"]
        assert rows[name]["status"] == "ok" and rows[name]["effect"] is not None


@pytest.mark.slow  # what the shipped weights learnt: clips at the evaluation's settings
@pytest.mark.parametrize(("first", "last", "seed"), [("black", "green", 0), ("blue", "black", 1)])
def test_prompt_travel_frames_follow_their_key(pipe, results, first, last, seed):
    """Prompt travel on the built-in model: frames near each key show that key's background
    (the world's background detector), more than frames near the other key do."""
    from animatediff.world import detect

    video = pipe(
        {0: f"a red circle on a {first} background", 15: f"a red circle on a {last} background"},
        seed=seed,
        **settings(results),
    )
    backgrounds = [detect.background_colour(f) for f in video.frames[0].permute(1, 2, 3, 0).numpy()]
    head, tail = backgrounds[:3], backgrounds[-3:]
    assert head.count(first) >= 2 and tail.count(last) >= 2, backgrounds
    assert head.count(first) > tail.count(first) and tail.count(last) > head.count(last), (
        backgrounds
    )
