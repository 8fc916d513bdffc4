"""The evaluation of the built-in model: its metrics checked on the world's ground-truth clips,
and the whole evaluation run end to end (tiny: 2 prompts, 4 frames, 2 steps)."""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch

from animatediff import builtin
from animatediff.builtin.model import builtin_model
from animatediff.world import (
    PAN_LEFT_DX,
    STYLES,
    VOCABULARY,
    caption,
    make_clip,
    parse_caption,
    random_scene,
    render,
    render_styled,
    style_images,
    web_video,
)
from animatediff.world.evaluate import SKIPPED, evaluate, lora_rank
from animatediff.world.evaluate_settings import CAMERA_PROMPTS, PROMPTS, QUICK_PROMPTS
from animatediff.world.metrics import (
    camera_effect,
    camera_motion,
    clip_alignment,
    clip_metrics,
    domain_similarity,
    frame_alignment,
    watermark_rate,
)
from animatediff.world.report import format_table, save_results, target_checks
from animatediff.world.scene import BACKGROUND_COLOURS, OBJECT_COLOURS, SHAPES
from animatediff.world.styles import SIZES

FRAMES = 12
ROW_KEYS = {
    "status",
    "model",
    "style",
    "clips",
    "text_alignment",
    "colour_alignment",
    "shape_alignment",
    "background_alignment",
    "background_stability",
    "temporal_consistency",
    "motion_smoothness",
    "dynamic_degree",
    "motion_alignment",
    "motion_alignment_by_kind",
    "watermark_rate",
    "style_scores",
    "style_rate",
    "style_score",
    "style_score_stills",
    "domain_similarity",
    "seconds",
}


@pytest.fixture(scope="module")
def clips() -> dict[str, tuple[np.ndarray, str, dict]]:
    kinds = ("static", "move", "grow", "shrink", "turn", "zoom-in", "pan-left")
    return {kind: make_clip(10 + i, num_frames=FRAMES, kind=kind) for i, kind in enumerate(kinds)}


# --- the prompt set -------------------------------------------------------------------------


def test_prompts_cover_the_grammar_and_use_its_words():
    assert len(PROMPTS) == 12 and len(set(PROMPTS)) == 12
    assert len(QUICK_PROMPTS) == 2 and set(QUICK_PROMPTS) <= set(PROMPTS)
    parsed = [parse_caption(p) for p in PROMPTS]
    assert {p.kind for p in parsed} == {"static", "move", "grow", "shrink", "turn"}
    assert {p.direction for p in parsed if p.kind == "move"} == {"left", "right"}
    objects = [o for p in parsed for o in p.objects]
    assert {c for c, _ in objects} == set(OBJECT_COLOURS)
    assert {s for _, s in objects} == set(SHAPES)
    assert {p.background for p in parsed} == set(BACKGROUND_COLOURS)
    assert all(c != p.background for p in parsed for c, _ in p.objects)
    for kind, prompts in CAMERA_PROMPTS.items():
        assert {parse_caption(p).kind for p in prompts} == {kind}
    for text in [*PROMPTS, *(p for v in CAMERA_PROMPTS.values() for p in v)]:
        assert set(text.split()) <= set(VOCABULARY), text


# --- metrics on ground truth ----------------------------------------------------------------


def test_ground_truth_clips_score_high(clips):
    kinds = ("static", "move", "grow", "shrink", "turn")
    m = clip_metrics([clips[k][0] for k in kinds], [clips[k][1] for k in kinds])
    assert m["clips"] == 5
    for key in (
        "text_alignment",
        "colour_alignment",
        "shape_alignment",
        "background_alignment",
        "motion_alignment",
    ):
        assert m[key] == 1.0, key
    assert m["motion_alignment_by_kind"] == {k: 1.0 for k in kinds}
    assert m["background_stability"] == 1.0
    assert m["temporal_consistency"] > 0.8
    assert m["motion_smoothness"] > 0.9
    assert m["dynamic_degree"] == pytest.approx(4 / 5)  # all but the static clip move
    assert m["watermark_rate"] == 0.0
    assert m["style_rate"]["plain"] == 1.0 and m["style_scores"]["plain"] > 0.9


def test_static_clip_is_not_dynamic_and_a_shuffled_clip_is_inconsistent(clips):
    static, text, _ = clips["static"]
    m = clip_metrics([static], [text])
    assert m["dynamic_degree"] == 0.0 and m["motion_alignment"] == 1.0
    # Frames of unrelated clips in turn: the object keeps changing, the track jumps.
    others = [make_clip(100 + i, num_frames=FRAMES, kind="static")[0] for i in range(3)]
    mixed = np.stack([others[i % 3][i] for i in range(FRAMES)])
    bad = clip_metrics([mixed], [make_clip(100, num_frames=FRAMES, kind="static")[1]])
    assert bad["temporal_consistency"] < 0.5
    assert bad["dynamic_degree"] == 1.0 and bad["motion_alignment"] == 0.0


def test_alignment_counts_a_clip_when_most_frames_align(clips):
    frames, text, meta = clips["move"]
    assert frame_alignment(frames[0], text) == dict.fromkeys(
        ("colour", "shape", "background", "all"), True
    )
    scene = meta["scenes"][0]
    wrong_colour = next(c for c in OBJECT_COLOURS if c not in (scene.sprites[0].colour, "white"))
    wrong = text.replace(scene.sprites[0].colour, wrong_colour, 1)
    assert frame_alignment(frames[0], wrong)["colour"] is False
    assert frame_alignment(frames[0], wrong)["all"] is False
    other_bg = next(b for b in BACKGROUND_COLOURS if b != scene.background)
    checks = frame_alignment(
        frames[0], text.replace(f"{scene.background} background", f"{other_bg} background")
    )
    assert checks["background"] is False and checks["colour"] is True
    # Blank frames (background only) in a minority leave the clip aligned; in a majority not.
    blank = np.broadcast_to(frames[0, :1, :1], frames.shape).copy()
    few = np.concatenate([frames[:7], blank[:5]])
    many = np.concatenate([frames[:5], blank[:7]])
    assert clip_alignment(few, text)["all"] and not clip_alignment(many, text)["all"]
    assert clip_alignment(many, text)["background"]  # the background still holds


def test_background_stability_is_the_share_of_frames_on_the_majority_background(clips):
    """A clip whose background flickers to another colour in k of its frames is stable in
    FRAMES - k of them, whichever colour the caption names."""
    frames, text, meta = clips["static"]
    candidates = (make_clip(s, num_frames=FRAMES, kind="static") for s in range(200, 260))
    other = next(
        c for c in candidates if c[2]["scenes"][0].background != meta["scenes"][0].background
    )
    for k in (1, 3, 5):
        flicker = frames.copy()
        flicker[1 : 1 + 2 * k : 2] = other[0][1 : 1 + 2 * k : 2]
        m = clip_metrics([flicker, frames], [text, text])
        assert m["background_stability"] == pytest.approx((2 * FRAMES - k) / (2 * FRAMES))


def test_watermark_rate_of_web_and_clean_frames(clips):
    frames = clips["grow"][0]
    assert watermark_rate(web_video(frames)) == 1.0
    assert watermark_rate(frames) == 0.0
    mixed = np.concatenate([web_video(frames[:3]), frames[3:]])
    assert watermark_rate(mixed) == pytest.approx(3 / FRAMES)
    assert clip_metrics([web_video(frames)], [clips["grow"][1]])["watermark_rate"] == 1.0


def test_camera_motion_of_zoom_and_pan(clips):
    zoom = camera_motion([clips["zoom-in"][0]], [clips["zoom-in"][1]])
    pan = camera_motion([clips["pan-left"][0]], [clips["pan-left"][1]])
    still = camera_motion([clips["static"][0]], [clips["static"][1]])
    assert zoom["area_ratio"] > 1.5 and zoom["tracked"] == 1.0 and zoom["motion_alignment"] == 1.0
    assert math.copysign(1, pan["dx"]) == PAN_LEFT_DX and abs(pan["dx"]) > 0.1
    assert pan["motion_alignment"] == 1.0
    assert still["area_ratio"] == pytest.approx(1.0, abs=0.05) and abs(still["dx"]) < 0.01
    assert camera_effect("zoom-in", zoom, still) and not camera_effect("zoom-in", still, zoom)
    assert camera_effect("pan-left", pan, still) and not camera_effect("pan-left", still, pan)
    reversed_pan = camera_motion([clips["pan-left"][0][::-1]], [clips["pan-left"][1]])
    assert not camera_effect("pan-left", reversed_pan, still)
    assert camera_effect(None, zoom, still) is None
    # A clip where the named object is missing is left out of the means.
    lost = camera_motion(
        [clips["zoom-in"][0]], ["zooming in on a purple star on a black background"]
    )
    assert lost["tracked"] == 0.0 and lost["area_ratio"] is None


@pytest.mark.parametrize("style", STYLES)
def test_domain_similarity_of_styled_animation_to_styled_stills(style):
    # A styled sprite drifting right, its plain twin, and the style's own stills.
    scene = random_scene(np.random.default_rng(7), 1, radius=SIZES, pad=(0.05, 0.0))
    sprite = scene.sprites[0]
    scenes = [replace(scene, sprites=(replace(sprite, x=sprite.x + 0.01 * i),)) for i in range(4)]
    styled = np.stack([render_styled(s, style) for s in scenes])
    plain = np.stack([render(s) for s in scenes])
    text = caption(scene)
    stills = style_images(style, 4, seed=0)
    stills_m = clip_metrics([image[None] for image, _ in stills], [t for _, t in stills])
    anim = domain_similarity(clip_metrics([styled], [text]), stills_m, style)
    base = domain_similarity(clip_metrics([plain], [text]), stills_m, style)
    assert anim["style_score_stills"] > 0.5
    assert anim["domain_similarity"] > 0.7 and base["domain_similarity"] < 0.2
    assert anim["style_score"] > base["style_score"]
    zero = {"style_scores": {style: 0.0}}
    assert (
        domain_similarity(clip_metrics([styled], [text]), zero, style)["domain_similarity"] is None
    )


# --- reporting ------------------------------------------------------------------------------


def test_save_results_is_atomic_json_and_format_table_prints_every_section(tmp_path):
    row = {
        "status": "ok",
        "text_alignment": np.float64(0.5),
        "temporal_consistency": float("nan"),
        "style": "plain",
        "clips": np.int64(3),
    }
    results = {
        "settings": {"steps": 2, "seeds": (0,), "prompts": ["a"]},
        "model": {"trained": False},
        "main": row,
        "personal": {"stripes": {"status": SKIPPED}},
        "baselines": {
            "frame_by_frame": {"base": row},
            "image_layers": {"base": {"status": SKIPPED}},
        },
        "adapter": {"1.0": {"status": SKIPPED}, "0.0": {**row, "watermark_rate": 0.25}},
        "motion_loras": {
            "zoom-in": {"status": SKIPPED, "source": "builtin", "kind": "zoom-in"},
            "zoom-r2": {
                "status": "ok",
                "source": "extra",
                "kind": "zoom-in",
                "rank": 2,
                "clips": 10,
                "strength": {
                    "1.0": {"area_ratio": 1.8, "dx": 0.0, "motion_alignment": 1.0},
                    "0.0": {"area_ratio": 1.0, "dx": None, "motion_alignment": 0.0},
                },
                "effect": True,
            },
        },
    }
    out = tmp_path / "sub" / "results.json"
    out.parent.mkdir()
    out.write_text("old")
    assert save_results(results, out) == out
    data = json.loads(out.read_text())
    assert data["main"]["text_alignment"] == 0.5 and data["main"]["temporal_consistency"] is None
    assert data["main"]["clips"] == 3 and data["settings"]["seeds"] == [0]
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary left
    table = format_table(results)
    assert "| base + motion module | 0.500 | – |" in table
    assert "| stripes + motion module | skipped: not installed |" in table
    assert "| 0.0 | 0.250 | 0.500 |" in table
    assert (
        "| zoom-r2 | extra | zoom-in | 2 | 10 | 1.800 | 1.000 | 0.000 | – | 1.000 | 0.000 | yes |"
        in table
    )
    assert sum(line.startswith("|---|") for line in table.splitlines()) == 4
    assert "| all three (text) | 0.500 | 0.500 | met |" in table
    assert "| shape | – | 0.600 | not measured |" in table
    assert "| zoom-in seeds in direction (of 8) | – | 7 | not measured |" in table


def test_target_checks_say_by_how_much_a_target_is_missed():
    def main(**values) -> dict:
        return {"status": "ok", **values}

    moved = {"area_ratio": 1.2, "dx": 0.0, "motion_alignment": 1.0}
    results = {
        "main": main(shape_alignment=0.45, temporal_consistency=0.6, background_stability=0.95),
        "baselines": {"frame_by_frame": {"base": main(temporal_consistency=0.7)}},
        "adapter": {"1.0": main(watermark_rate=0.5), "0.0": main(watermark_rate=0.05)},
        "motion_loras": {
            "zoom-in": main(seeds_in_direction=8, strength={"1.0": moved, "0.0": moved}),
            "pan-left": {"status": SKIPPED},
        },
    }
    checks = {name: (value, met) for name, value, _, met in target_checks(results)}
    assert checks["shape"] == (0.45, False) and checks["colour"] == (None, False)
    assert checks["frames on their clip's majority background"] == (0.95, True)
    assert checks["consistency above frame by frame"] == (pytest.approx(-0.1), False)
    assert checks["watermarks removed by adapter scale 0"] == (pytest.approx(0.9), True)
    assert checks["zoom-in seeds in direction (of 8)"] == (8, True)
    assert checks["pan-left seeds in direction (of 8)"] == (None, False)
    assert "| shape | 0.450 | 0.600 | missed by 0.150 |" in format_table(results)


# --- end to end -----------------------------------------------------------------------------

TINY = dict(quick=True, steps=2, num_frames=4, progress=None)


def _statuses(results: dict) -> list[str]:
    rows = [results["main"], *results["personal"].values(), *results["adapter"].values()]
    rows += [*results["motion_loras"].values()]
    for section in results["baselines"].values():
        rows += section.values()
    return [row["status"] for row in rows]


@pytest.mark.slow  # every row of the evaluation, quick settings
def test_evaluate_quick_runs_end_to_end(tmp_path):
    results = evaluate(**TINY)
    assert list(results) == [
        "settings",
        "model",
        "main",
        "personal",
        "baselines",
        "adapter",
        "motion_loras",
        "seconds",
    ]
    assert set(results["main"]) == ROW_KEYS and results["main"]["clips"] == 2
    assert set(results["baselines"]) == {"frame_by_frame", "image_layers"}
    assert set(results["baselines"]["frame_by_frame"]["base"]) == ROW_KEYS
    assert set(results["adapter"]) == {"1.0", "0.0"}
    assert {"stripes", "outline", "outline-lora"} <= set(results["personal"])
    assert {"zoom-in", "pan-left"} <= set(results["motion_loras"])
    assert all(s == "ok" or s.startswith("skipped") for s in _statuses(results))
    assert results["settings"]["num_frames"] == 4 and results["settings"]["seeds"] == [0]
    assert "| base + motion module |" in format_table(results)
    saved = json.loads(save_results(results, tmp_path / "results.json").read_text())
    assert saved["main"]["clips"] == 2


def _pairs(model: torch.nn.Module, targets: list[str], generator: torch.Generator) -> dict:
    from animatediff.lora import LoRAPair

    pairs = {}
    for name in targets:
        out, inp = model.get_submodule(name).weight.shape
        down = torch.randn(2, inp, generator=generator) * 0.05
        pairs[name] = LoRAPair(down, torch.randn(out, 2, generator=generator) * 0.05)
    return pairs


@pytest.fixture
def fake_extras(tmp_path, monkeypatch):
    """A package data folder of extras made for the built-in model (random small LoRAs, a
    personal checkpoint equal to the base, the base itself as the baseline), with "outline"
    and "pan-left" left out; plus an extra pan MotionLoRA file."""
    from animatediff.checkpoints.base import load_base
    from animatediff.checkpoints.export import save_kohya_lora, save_single_file
    from animatediff.checkpoints.io import save_state_dict
    from animatediff.checkpoints.lora import to_official_layout
    from animatediff.checkpoints.motion import load_motion_module
    from animatediff.training.stages import motion_attention_targets, spatial_attention_targets

    model = builtin_model()
    data = tmp_path / "data"
    (data / "personal").mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    image = load_base(model.base)
    spatial = spatial_attention_targets(image.unet)
    save_single_file(
        image.unet, image.vae, image.text_encoder, data / "personal" / "stripes.safetensors"
    )
    save_kohya_lora(_pairs(image.unet, spatial, g), data / "outline-lora.safetensors")
    save_state_dict(
        to_official_layout(_pairs(image.unet, spatial, g)), data / "domain_adapter.safetensors"
    )
    motion = load_motion_module(model.motion_module)
    for file in ("zoom-in.safetensors", "pan-r2.safetensors"):
        pairs = _pairs(motion, motion_attention_targets(motion), g)
        save_state_dict(to_official_layout(pairs), data / file)
    shutil.copytree(model.base / "unet", data / "baseline" / "unet")
    shutil.copy(model.motion_module, data / "baseline" / "motion_module.safetensors")
    manifest = {
        "personal": {
            "stripes": {"file": "personal/stripes.safetensors", "kind": "checkpoint"},
            "outline-lora": {"file": "outline-lora.safetensors", "kind": "lora"},
        },
        "motion_loras": {"zoom-in": {"file": "zoom-in.safetensors"}},
    }
    (data / "manifest.json").write_text(json.dumps(manifest))
    monkeypatch.setattr(builtin, "PACKAGE_DATA", data)
    return {"pan-r2": (data / "pan-r2.safetensors", {"rank": 2, "clips": 10})}


@pytest.mark.skipif(
    bool(builtin.manifest()["personal"]), reason="the shipped extras run in the test above"
)
def test_evaluate_runs_every_row_with_extras(fake_extras):
    assert lora_rank(fake_extras["pan-r2"][0]) == 2
    # One step without guidance: every row's code path at the least cost.
    tiny = {**TINY, "steps": 1, "guidance_scale": 1.0}
    results = evaluate(**tiny, extra_motion_loras=fake_extras)
    personal, baselines = results["personal"], results["baselines"]
    assert personal["outline"]["status"] == SKIPPED
    for name, style in (("stripes", "stripes"), ("outline-lora", "outline")):
        assert personal[name]["status"] == "ok" and personal[name]["style"] == style
        assert set(personal[name]) == ROW_KEYS | {"kind"}
        for section in ("frame_by_frame", "image_layers"):
            assert set(baselines[section][name]) == ROW_KEYS
    assert baselines["image_layers"]["base"]["status"] == "ok"
    assert baselines["image_layers"]["outline"]["status"] == SKIPPED
    assert results["adapter"]["1.0"]["status"] == "ok"
    assert results["adapter"]["0.0"]["watermark_rate"] == results["main"]["watermark_rate"]
    loras = results["motion_loras"]
    assert loras["pan-left"]["status"] == SKIPPED
    assert loras["zoom-in"]["kind"] == "zoom-in" and loras["zoom-in"]["rank"] == 2
    pan = loras["pan-r2"]
    assert (pan["status"], pan["source"], pan["kind"], pan["rank"], pan["clips"]) == (
        "ok",
        "extra",
        "pan-left",
        2,
        10,
    )
    for name in ("zoom-in", "pan-r2"):
        assert set(loras[name]["strength"]) == {"1.0", "0.0"}
        assert isinstance(loras[name]["effect"], bool)
        # quick: judged at the evaluation's one seed, which gives the pooled effect too
        assert loras[name]["effect_by_seed"] == {"0": loras[name]["effect"]}
        assert loras[name]["seeds_in_direction"] == int(loras[name]["effect"])
    assert all(s == "ok" or s.startswith("skipped") for s in _statuses(results))
    table = format_table(results)
    assert "| outline-lora + image-layer-trained MM | " in table and "| pan-r2 | extra |" in table
