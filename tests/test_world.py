"""The miniature world: every detector checked against rendered ground truth."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from animatediff.checkpoints.fewstep import Release, release_metadata
from animatediff.checkpoints.io import load_state_dict, tensors_sha256
from animatediff.checkpoints.io import save_state_dict as save_tensors
from animatediff.world import (
    CAMERA_KINDS,
    KINDS,
    PAN_LEFT_DX,
    STYLES,
    VOCABULARY,
    Scene,
    Sprite,
    caption,
    classify_shape,
    classify_style,
    dominant_object,
    dynamic_degree,
    has_watermark,
    is_dynamic,
    make_clip,
    motion_alignment,
    motion_smoothness,
    parse_caption,
    random_scene,
    render,
    render_styled,
    segment,
    style_images,
    style_score,
    temporal_consistency,
    text_alignment,
    track,
    watermark_score,
    web_video,
)
from animatediff.world.build import main as build_main
from animatediff.world.build import restore_cache, save_cache
from animatediff.world.datasets import motion_clips, write_images, write_videos
from animatediff.world.detect import alignment_checks, displacement, object_mask
from animatediff.world.domain import blur, watermark
from animatediff.world.motion import DISTANCE, GROWTH, PAN, ZOOM
from animatediff.world.pack import _carry_students, add_student
from animatediff.world.scene import OBJECT_COLOURS, SHAPES

SIZE = 64


@pytest.fixture(scope="module")
def clips() -> dict[str, tuple[np.ndarray, str, dict]]:
    """One clean 12-frame clip of every kind, shared by the motion tests."""
    return {kind: make_clip(i, num_frames=12, kind=kind) for i, kind in enumerate(KINDS)}


def scenes(n: int, seed: int = 0) -> list[Scene]:
    return [random_scene(np.random.default_rng([seed, i])) for i in range(n)]


# --- scenes, captions, determinism ----------------------------------------------------------


def test_render_is_deterministic_uint8_and_antialiased():
    scene = random_scene(np.random.default_rng(3))
    image = render(scene)
    assert image.shape == (SIZE, SIZE, 3) and image.dtype == np.uint8
    assert np.array_equal(image, render(random_scene(np.random.default_rng(3))))
    assert render(scene, 32).shape == (32, 32, 3)
    # Supersampling leaves in-between colours along edges.
    sprite = scene.sprites[0]
    edge = ~segment(image, sprite.colour) & ~segment(image, scene.background)
    assert edge.sum() > 10


def test_make_clip_is_deterministic_from_a_seed():
    a, caption_a, meta_a = make_clip(7, num_frames=4)
    b, caption_b, meta_b = make_clip(np.random.default_rng(7), num_frames=4)
    assert a.shape == (4, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and caption_a == caption_b and meta_a == meta_b
    assert meta_a["kind"] in KINDS and len(meta_a["scenes"]) == 4
    assert not np.array_equal(a, make_clip(8, num_frames=4)[0])


def test_captions_use_only_the_vocabulary_and_parse_back(clips):
    texts = [caption(s) for s in scenes(20)] + [c for _, c, _ in clips.values()]
    assert any(" and " in t for t in texts)  # some stills have two sprites
    for text in texts:
        assert set(text.split()) <= set(VOCABULARY), text
    for kind, (_, text, meta) in clips.items():
        parsed = parse_caption(text)
        first = meta["scenes"][0]
        assert parsed.kind == kind and parsed.direction == meta["direction"]
        assert parsed.objects == tuple((s.colour, s.shape) for s in first.sprites)
        assert parsed.background == first.background
    assert clips["pan-left"][1].startswith("panning left over a ")
    assert clips["zoom-in"][1].startswith("zooming in on a ")
    with pytest.raises(ValueError):
        caption(scenes(1)[0], "spin")


def test_sprites_stay_in_frame_and_apart_and_differ_from_background():
    for scene in scenes(40, seed=1):
        image = render(scene)
        assert all(s.colour != scene.background for s in scene.sprites)
        assert len({s.colour for s in scene.sprites}) == len(scene.sprites)
        for sprite in scene.sprites:
            mask = segment(image, sprite.colour)
            assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any())


# --- segmentation and shapes ----------------------------------------------------------------


@pytest.mark.parametrize("colours", [("red", "blue"), ("white", "black"), ("yellow", "green")])
def test_segment_area_matches_the_rendered_size(colours):
    # Edge pixels mix two colours and may land on either or on a third (red + blue = purple),
    # so the area lies between the shape shrunk and grown by one pixel.
    colour, background = colours
    for size in (0.15, 0.25):
        r = size * SIZE
        circle = Scene((Sprite("circle", colour, 0.5, 0.5, size),), background)
        assert (
            math.pi * (r - 1) ** 2
            <= segment(render(circle), colour).sum()
            <= math.pi * (r + 1) ** 2
        )
        side = 2 * 0.85 * r
        square = Scene((Sprite("square", colour, 0.5, 0.5, size),), background)
        assert (side - 2) ** 2 <= segment(render(square), colour).sum() <= (side + 2) ** 2


def test_dominant_object_finds_colour_and_mask():
    for scene in scenes(20, seed=2):
        image = render(scene)
        colour, mask = dominant_object(image)
        assert colour in {s.colour for s in scene.sprites}
        if len(scene.sprites) == 1:
            assert colour == scene.sprites[0].colour
        assert np.array_equal(mask, object_mask(image, colour))
    assert dominant_object(render(Scene((), "green")))[0] is None


def test_classify_shape_on_random_scenes():
    right = total = 0
    for scene in scenes(60, seed=3):
        image = render(scene)
        for sprite in scene.sprites:
            right += classify_shape(object_mask(image, sprite.colour)) == sprite.shape
            total += 1
    assert right / total >= 0.95
    for shape in SHAPES:  # every shape at every tested angle
        for angle in (0, 17, 40):
            scene = Scene((Sprite(shape, "yellow", 0.5, 0.5, 0.2, angle),), "black")
            assert classify_shape(segment(render(scene), "yellow")) == shape
    assert classify_shape(np.zeros((SIZE, SIZE), bool)) == "none"


# --- tracking and motion --------------------------------------------------------------------


def test_track_recovers_linear_motion(clips):
    frames, _, meta = clips["move"]
    path = track(frames, meta["scenes"][0].sprites[0].colour)
    truth = [(s.sprites[0].x, s.sprites[0].y) for s in meta["scenes"]]
    for (x, y, area), (tx, ty) in zip(path, truth):
        assert x == pytest.approx(tx, abs=0.01) and y == pytest.approx(ty, abs=0.01)
        assert area > 0.02
    dx, dy, _ = displacement(path)
    assert math.hypot(dx, dy) == pytest.approx(DISTANCE[meta["speed"]], abs=0.02)
    assert motion_smoothness(path) > 0.95
    jittery = [(x + 0.05 * (-1) ** i, y, a) for i, (x, y, a) in enumerate(path)]
    assert motion_smoothness(jittery) < 0.5
    assert motion_smoothness([*path[:-1], (math.nan, math.nan, 0.0)]) == 0.0


def test_zoom_grows_the_area_and_pan_moves_content_the_documented_way(clips):
    zoom = track(clips["zoom-in"][0])
    areas = [a for _, _, a in zoom]
    assert all(b > a for a, b in zip(areas, areas[1:]))
    assert areas[-1] / areas[0] == pytest.approx(ZOOM**2, rel=0.1)
    pan = track(clips["pan-left"][0])
    dx, dy, ratio = displacement(pan)
    assert PAN_LEFT_DX == -1 and dx < 0  # the spec: pan-left moves the content left
    assert dx * PAN_LEFT_DX == pytest.approx(PAN, abs=0.02) and abs(dy) < 0.01
    assert ratio == pytest.approx(1, abs=0.05)
    # The background texture moves with the camera too, not just the sprite.
    frames, _, meta = clips["pan-left"]
    colour = meta["scenes"][0].sprites[0].colour
    background = ~(object_mask(frames[0], colour) | object_mask(frames[-1], colour))
    assert np.abs(frames[-1].astype(int) - frames[0])[background].mean() > 3


def test_grow_and_shrink_change_the_area_as_planned(clips):
    _, _, grow = displacement(track(clips["grow"][0]))
    _, _, shrink = displacement(track(clips["shrink"][0]))
    assert grow == pytest.approx(GROWTH**2, rel=0.1)
    assert shrink == pytest.approx(GROWTH**-2, rel=0.1)


def test_motion_alignment_matches_each_kind_and_rejects_wrong_captions(clips):
    for kind, (frames, text, _) in clips.items():
        assert motion_alignment(frames, text) == 1.0, text
        assert motion_alignment(frames[::-1], text) == (kind == "static"), text
    frames, text, meta = clips["move"]
    opposite = {"left": "right", "right": "left", "up": "down", "down": "up"}[meta["direction"]]
    assert motion_alignment(frames, text.replace(meta["direction"], opposite)) == 0.0
    static = clips["static"][0]
    assert motion_alignment(static, text) == 0.0


def test_temporal_consistency_and_dynamic_degree(clips):
    for kind, (frames, _, _) in clips.items():
        assert temporal_consistency(frames) > 0.85, kind
        assert is_dynamic(frames) == (kind != "static"), kind
    # A cut to another clip midway breaks consistency.
    a, b = clips["static"][0], clips["move"][0]
    assert temporal_consistency(np.concatenate([a[:6], b[6:]])) < 0.8
    assert dynamic_degree([f for f, _, _ in clips.values()]) == pytest.approx(6 / 7)


# --- web domain and styles ------------------------------------------------------------------


def test_watermark_on_web_frames_only():
    frames = make_clip(11, num_frames=4, kind="move")[0]
    web = web_video(frames)
    assert has_watermark(web[0]) and watermark_score(web) > 0.9
    for scene in scenes(20, seed=4):
        image = render(scene)
        assert not has_watermark(image)
        assert has_watermark(watermark(image)) and has_watermark(watermark(blur(image)))
    softened = blur(frames[0])
    assert np.abs(softened.astype(int) - frames[0]).max() > 30  # edges soften...
    assert softened.mean() == pytest.approx(frames[0].mean(), abs=1)  # ...colours stay


@pytest.mark.parametrize("style", STYLES)
def test_style_detector_tells_each_style_from_plain(style):
    for image, text in style_images(style, 8, seed=5):
        assert classify_style(image) == style
        assert style_score(image, style) > 0.5 > style_score(image, "plain")
        assert text_alignment(image, text) == 1.0  # styles keep colour and silhouette
    for scene in scenes(8, seed=5):
        assert classify_style(render(scene)) == "plain"
    scene = scenes(1)[0]
    assert not np.array_equal(render_styled(scene, style), render(scene))


# --- captions against frames ----------------------------------------------------------------


def test_text_alignment_is_one_for_the_caption_and_zero_for_wrong_words():
    for scene in scenes(20, seed=6):
        image = render(scene)
        assert text_alignment(image, caption(scene)) == 1.0
        sprite = scene.sprites[0]
        used = {s.colour for s in scene.sprites} | {scene.background}
        colour = next(c for c in OBJECT_COLOURS if c not in used)
        shape = next(s for s in SHAPES if s != sprite.shape)
        for wrong in (replace(sprite, colour=colour), replace(sprite, shape=shape)):
            wrong_scene = replace(scene, sprites=(wrong, *scene.sprites[1:]))
            assert text_alignment(image, caption(wrong_scene)) == 0.0
        other = next(c for c in ("black", "white", "blue", "green") if c != scene.background)
        checks = alignment_checks(image, caption(replace(scene, background=other)))
        assert not checks[f"{other} background"] and sum(checks.values()) == len(checks) - 1


def test_detectors_accept_float_and_torch_layouts(clips):
    torch = pytest.importorskip("torch")
    frames, text, _ = clips["grow"]
    as_float = frames.astype(np.float32) / 255
    as_torch = torch.from_numpy(as_float).permute(3, 0, 1, 2)  # (3, f, h, w), like read_video
    for video in (as_float, as_torch):
        assert motion_alignment(video, text) == 1.0
        assert text_alignment(video, text) == 1.0
    assert track(as_torch) == track(frames)


# --- datasets -------------------------------------------------------------------------------


def test_write_images_and_style_sets(tmp_path):
    paths = write_images(tmp_path / "plain", 3, seed=0)
    styled = write_images(tmp_path / "stripes", 2, seed=0, style="stripes")
    for path in paths + styled:
        image = np.asarray(Image.open(path))
        text = path.with_suffix(".txt").read_text().strip()
        assert image.shape == (SIZE, SIZE, 3) and text_alignment(image, text) == 1.0
        assert not has_watermark(image)
    assert classify_style(np.asarray(Image.open(styled[0]))) == "stripes"
    again = write_images(tmp_path / "again", 2, seed=0)
    assert again[1].with_suffix(".txt").read_text() == paths[1].with_suffix(".txt").read_text()


def test_write_videos_round_trip_through_h264(tmp_path):
    from animatediff.video import read_video

    paths = write_videos(tmp_path, 2, seed=0, kinds=["pan-left", "static"], num_frames=8)
    assert [p.name for p in paths] == ["clip_00000.mp4", "clip_00001.mp4"]
    for path in paths:
        video = read_video(path)
        text = path.with_suffix(".txt").read_text().strip()
        assert tuple(video.shape) == (3, 8, SIZE, SIZE)
        assert has_watermark(video[:, 0].permute(1, 2, 0).numpy())
        assert motion_alignment(video, text) == 1.0
    clean = write_videos(tmp_path / "clean", 1, seed=0, kinds=["static"], web=False, num_frames=4)
    assert not has_watermark(read_video(clean[0])[:, 0].permute(1, 2, 0).numpy())


def test_motion_clips_are_camera_motion_only():
    for kind in CAMERA_KINDS:
        items = motion_clips(kind, 2, seed=0, num_frames=4)
        assert [meta["kind"] for _, _, meta in items] == [kind, kind]
        assert np.array_equal(items[0][0], motion_clips(kind, 1, seed=0, num_frames=4)[0][0])
    with pytest.raises(ValueError):
        motion_clips("move", 1, seed=0)


def test_mix_frames_takes_frame_f_of_clip_i_from_clip_i_plus_f():
    from animatediff.world.direction import coherence_losses, mix_frames

    x = torch.arange(3 * 4, dtype=torch.float32).reshape(3, 1, 4, 1, 1)  # value = 4 * clip + frame
    mixed = mix_frames(x)
    for i in range(3):
        for f in range(4):
            assert mixed[i, 0, f, 0, 0] == 4 * ((i + f) % 3) + f
    with pytest.raises(ValueError, match="at least 2 clips"):
        coherence_losses(None, x[:1])


# --- the build recipe and the caption probe -------------------------------------------------


def test_recipe_is_valid_training_configs_and_pack_does_not_import_the_build(tmp_path):
    import ast
    from pathlib import Path

    from animatediff.training import parse_config
    from animatediff.world import build, pack, recipe

    configs = recipe.stage_configs(tmp_path)
    assert list(configs) == list(recipe.RESULTS)  # every run has a result the build waits for
    for name, cfg in configs.items():
        parsed = parse_config(cfg)
        assert Path(parsed.output_dir).name == name, name
    assert configs["base"]["train"]["train_text_encoder"]
    motion = parse_config(configs[recipe.MOTION_RUN])
    assert motion.train.noise.shared_noise == recipe.SHARED_NOISE > 0
    for kind in recipe.MOTION_LORAS:  # they take the module's own prior
        lora = parse_config(configs[f"motion-lora-{kind}"])
        assert lora.train.noise.shared_noise is None and lora.motion_module.endswith(
            f"{recipe.MOTION_RUN}/motion_module.safetensors"
        )
    # build runs pack (`--pack`); pack reads the recipe, not the build (no import cycle)
    imports = {
        module.__name__: [
            n.module
            for n in ast.walk(ast.parse(Path(module.__file__).read_text()))
            if isinstance(n, ast.ImportFrom)
        ]
        for module in (build, pack)
    }
    assert "recipe" in imports[pack.__name__] and "build" not in imports[pack.__name__]


def test_build_datasets_render_the_first_items_whatever_the_count(tmp_path):
    from animatediff.world.build import datasets

    sets = datasets()
    assert {"images", "videos", "style-stripes", "motion-pan-left"} <= set(sets)
    for name, first in (("style-stripes", "image_00000.png"), ("images", "image_00000.txt")):
        _, write = sets[name]
        write(tmp_path / name / "a", 1)
        write(tmp_path / name / "b", 3)
        a, b = (tmp_path / name / x / first for x in "ab")
        assert a.read_bytes() == b.read_bytes(), name


def test_stills_can_carry_any_clip_kind_caption_of_their_first_frame(tmp_path):
    """Half the stills (by the recipe's share) carry a caption of some clip kind, camera
    kinds too; the scene, and so the image, is the one a static caption would describe."""
    plain = write_images(tmp_path / "plain", 40, seed=3)
    mixed = write_images(tmp_path / "mixed", 40, seed=3, motion_captions=0.5)
    kinds = []
    for a, b in zip(plain, mixed):
        assert a.read_bytes() == b.read_bytes()  # the same image
        static, text = (p.with_suffix(".txt").read_text().strip() for p in (a, b))
        parsed, truth = parse_caption(text), parse_caption(static)
        assert (parsed.objects, parsed.background) == (truth.objects, truth.background)
        kinds.append(parsed.kind)
    assert 10 <= sum(k != "static" for k in kinds) <= 30
    assert {"move", "zoom-in", "pan-left"} <= set(kinds)


def test_probe_captions_change_one_thing_each():
    from animatediff.world.probe import SWAPPABLE, captions, probe_scenes

    scenes = probe_scenes(20, seed=1)
    assert scenes == probe_scenes(20, seed=1)
    for scene in scenes:
        (sprite,) = scene.sprites
        assert sprite.colour in SWAPPABLE and scene.background in SWAPPABLE
        kind = ("static", "move", "pan-left")[len(scene.background) % 3]
        texts = {k: parse_caption(v) for k, v in captions(scene, kind).items()}
        assert {t.kind for t in texts.values()} == {kind}
        assert texts["true"].objects == ((sprite.colour, sprite.shape),)
        assert texts["true"].background == scene.background
        (colour, shape), background = texts["shape"].objects[0], texts["shape"].background
        assert (colour, background) == (sprite.colour, scene.background) and shape != sprite.shape
        assert texts["swap"].objects == ((scene.background, sprite.shape),)
        assert texts["swap"].background == sprite.colour


def test_probe_ratio_is_one_exactly_when_the_unet_ignores_the_text(tmp_path):
    """With every cross-attention's output projection zeroed the UNet cannot see the caption:
    both ratios are 1.0 at every timestep; the same model unchanged reads it (ratios move). A
    trainer checkpoint loads on top of a base."""
    from animatediff.builtin.model import random_model
    from animatediff.checkpoints.base import load_base
    from animatediff.checkpoints.io import save_state_dict
    from animatediff.world.probe import caption_ratios, load_checkpoint

    image = load_base(random_model().base)
    reads = caption_ratios(image, images=4, timesteps=(300, 700))
    assert any(abs(r - 1) > 1e-4 for v in reads.values() for r in v), reads
    blind = {
        f"unet2d.{k}": torch.zeros_like(v) if "attn2.to_out.0.weight" in k else v
        for k, v in image.unet.state_dict().items()
    }
    (tmp_path / "step-1").mkdir()
    save_state_dict(blind, tmp_path / "step-1" / "trainable.safetensors")
    load_checkpoint(image, tmp_path / "step-1")
    ratios = caption_ratios(image, images=4, timesteps=(300, 700))
    assert all(r == pytest.approx(1.0, abs=1e-6) for v in ratios.values() for r in v), ratios


def test_pack_keeps_a_student_of_the_packed_teacher_only(tmp_path):
    """A repack carries the shipped few-step student over while its teacher is the packed motion
    module (the same tensors, however the file's header is ordered), and drops it (it would
    sample wrongly) when the motion module changed."""
    target = tmp_path / "data"
    (target / "motion_modules").mkdir(parents=True)
    (target / "motion_modules" / "s.safetensors").write_bytes(b"student")
    entry = {"file": "motion_modules/s.safetensors", "steps": 4}
    weights = {"a": torch.ones(2), "b": torch.zeros(3)}
    teacher = save_tensors(weights, tmp_path / "teacher.safetensors", metadata={"x": "1", "y": "2"})
    entry["teacher_tensors_sha256"] = tensors_sha256(teacher)
    (target / "manifest.json").write_text(json.dumps({"motion_modules": {"s": entry}}))
    reordered = {"b": torch.zeros(3), "a": torch.ones(2)}
    for packed, kept in ((reordered, True), ({**weights, "a": torch.full((2,), 2.0)}, False)):
        tmp = tmp_path / f"new-{kept}"
        tmp.mkdir()
        save_tensors(packed, tmp / "motion_module.safetensors", metadata={"y": "2", "x": "1"})
        manifest: dict = {"personal": {}, "motion_loras": {}}
        _carry_students(target, tmp, manifest)
        assert ("s" in manifest.get("motion_modules", {})) == kept
        assert (tmp / entry["file"]).exists() == kept


def test_a_distilled_student_ships_with_its_teacher_hash_and_lora(tmp_path):
    """`build --student NAME=RUN` ships a distill run's module (and image-layer LoRA) in fp16
    under NAME, with the packed teacher's hash; a repack keeps both files while the teacher is
    unchanged; a module without release steps is refused."""
    target, run = tmp_path / "data", tmp_path / "run"
    target.mkdir()
    run.mkdir()
    teacher = save_tensors({"w": torch.ones(2)}, target / "motion_module.safetensors")
    (target / "manifest.json").write_text(json.dumps({"personal": {}, "motion_loras": {}}))
    meta = release_metadata(Release("distilled 4-step", "animatelcm", 4))
    save_tensors({"m": torch.randn(3, 2)}, run / "motion_module.safetensors", metadata=meta)
    save_tensors({"l": torch.randn(2, 2)}, run / "distill_lora.safetensors")
    entry = add_student("s4", run, target)
    shipped = json.loads((target / "manifest.json").read_text())["motion_modules"]["s4"]
    assert shipped == entry and entry["steps"] == 4
    assert entry["teacher_tensors_sha256"] == tensors_sha256(teacher)
    assert load_state_dict(target / entry["file"])["m"].dtype == torch.float16
    assert load_state_dict(target / entry["adapter"])["l"].dtype == torch.float16
    tmp = tmp_path / "repack"
    tmp.mkdir()
    (tmp / "motion_module.safetensors").write_bytes(teacher.read_bytes())
    manifest: dict = {}
    _carry_students(target, tmp, manifest)
    assert manifest["motion_modules"]["s4"] == entry and (tmp / entry["adapter"]).exists()
    save_tensors({"m": torch.randn(3, 2)}, run / "motion_module.safetensors", overwrite=True)
    with pytest.raises(ValueError, match="not a distilled motion module"):
        add_student("plain", run, target)
    # `build --student` refuses a folder without a module before it builds anything
    with pytest.raises(SystemExit) as stopped:
        build_main([str(tmp_path / "work"), "--student", f"s={tmp_path / 'nowhere'}"])
    assert stopped.value.code == 2 and not (tmp_path / "work").exists()


def test_build_cache_mirrors_the_latest_checkpoint_only(tmp_path):
    """save_cache keeps what the work folder holds now (stale checkpoints go, folders too);
    restore_cache gives it back to a fresh work folder."""
    work, cache = tmp_path / "work", tmp_path / "cache"
    old = work / "runs" / "base" / "checkpoints" / "step-00000001"
    old.mkdir(parents=True)
    (old / "trainable.safetensors").write_bytes(b"1")
    save_cache(work, cache)
    new = work / "runs" / "base" / "checkpoints" / "step-00000002"
    new.mkdir()
    (new / "trainable.safetensors").write_bytes(b"22")
    (old / "trainable.safetensors").unlink()
    old.rmdir()
    save_cache(work, cache)
    kept = sorted(p.relative_to(cache).as_posix() for p in cache.rglob("*"))
    assert kept == [
        "runs", "runs/base", "runs/base/checkpoints", "runs/base/checkpoints/step-00000002",
        "runs/base/checkpoints/step-00000002/trainable.safetensors",
    ]  # fmt: skip
    restore_cache(cache, tmp_path / "fresh")
    assert (
        tmp_path / "fresh" / new.relative_to(work) / "trainable.safetensors"
    ).read_bytes() == b"22"
