"""Evaluate the built-in model on the miniature world: the quantities behind AnimateDiff's
Table 1 and its ablations, measured with the world's detectors (``detect``) instead of CLIP.

    python -m animatediff.world.evaluate [--quick] [--steps 25] [--out results.json]

Clips are generated at 64x64 from a fixed prompt set (``PROMPTS``, written with the caption
grammar) and fixed seeds (``SEEDS``), all prompts of a seed in one batch; ``quick`` uses
``QUICK_PROMPTS`` and one seed. Extras that are not installed (``builtin.manifest()`` empty,
no adapter, no baseline) give rows with ``status`` "skipped: not installed"; a row that fails
records "error: ..." and the evaluation goes on.

Rows (the ``results`` keys; every animated row holds the clip metrics below):
  main                          built-in base + motion module, domain adapter NOT applied
  personal[NAME]                each personal style (checkpoint or kohya LoRA) + the motion module
  baselines.frame_by_frame[M]   model M ("base" or a style) with ``motion_scale=0``: the image
                                model frame by frame; these frames are also M's own stills
  baselines.image_layers[M]     the motion module trained with the image layers fine-tuned
                                (``builtin.baseline()``) inserted into style M; for "base", with
                                its own fine-tuned UNet
  adapter["1.0" | "0.0"]        base + motion module with the domain adapter merged at that scale
                                ("0.0" is the main row)
  motion_loras[NAME]            a MotionLoRA (built-in or ``extra_motion_loras``) at strength
                                "1.0" and "0.0" on camera-motion prompts (``CAMERA_PROMPTS``)

Clip metrics (a clip is one prompt and seed; "in most frames" = in more than half the frames):
  text_alignment        share of clips where, in most frames, every named object is there with
                        its colour and shape and the background has its colour
  colour_alignment      share of clips where, in most frames, every named colour covers an object
  shape_alignment       share of clips where, in most frames, every named colour's region has
                        the named shape (``detect.classify_shape``)
  background_alignment  share of clips where, in most frames, the frame border has the named
                        background colour
  background_stability  share of frames whose background colour is their clip's commonest one
                        (1.0: no clip's background flickers)
  temporal_consistency  mean ``detect.temporal_consistency``: the first frame's object keeps its
                        colour and shape, times the mean IoU of consecutive centred masks
  motion_smoothness     mean ``detect.motion_smoothness`` of the first frame's dominant object's
                        centroid track (0 when the track loses it)
  dynamic_degree        share of clips that move (``detect.is_dynamic``)
  motion_alignment      mean ``detect.motion_alignment``: the first-named object moves as the
                        caption's motion word says ("static": it does not move)
  motion_alignment_by_kind  the same per caption kind (static, move, grow, shrink, turn)
  watermark_rate        share of frames with ``detect.has_watermark``
  style_scores          mean ``detect.style_scores`` of the frames, per style (plain, stripes,
                        outline)
  style_rate            share of frames whose ``detect.classify_style`` is each style
Domain (rows with a style: "plain" for the base, the style of a personal model):
  style_score           mean style score of the row's frames for the row's style (absolute)
  style_score_stills    the same for the model's own stills (its frame-by-frame row)
  domain_similarity     style_score / style_score_stills (None when the stills score < 1e-6)
MotionLoRA (per strength; the caption's first-named colour is tracked and clips where it is
missing in the first or last frame are left out):
  area_ratio            mean object area last frame / first frame (zoom-in: > 1 at strength 1)
  dx                    mean centroid x displacement last - first frame, in frame widths
                        (pan-left: its sign is ``motion.PAN_LEFT_DX`` at strength 1)
  tracked               share of clips where the object was found in the first and last frame
  motion_alignment      mean ``detect.motion_alignment`` for the camera caption
  effect                zoom-in: area_ratio at 1 is > 1 and above that at 0; pan-left: dx at 1
                        has the sign of PAN_LEFT_DX and is larger along it than at 0
  effect_by_seed        ``effect`` of each of ``CAMERA_SEEDS`` alone (its camera prompts at that
                        seed, strength 1 vs 0), and ``seeds_in_direction``: how many hold
"""

from __future__ import annotations

import argparse
import gc
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from .. import builtin
from ..builtin.model import builtin_model
from ..checkpoints.io import load_state_dict
from ..pipeline import AnimationPipeline
from .compare import run_comparison
from .evaluate_settings import (
    CAMERA_PROMPTS,
    CAMERA_SEEDS,
    GUIDANCE_SCALE,
    NEGATIVE_PROMPT,
    NUM_FRAMES,
    PROMPTS,
    QUICK_PROMPTS,
    QUICK_SEEDS,
    SEEDS,
    SIZE,
    STEPS,
    add_arguments,
)
from .metrics import Clip, camera_effect, camera_motion, clip_metrics, domain_similarity
from .recipe import DATA, MOTION_LORAS, STYLE_LORA
from .report import format_table, save_results
from .styles import STYLES

SKIPPED = "skipped: not installed"

Generated = list[tuple[str, Clip]]  # (caption, clip) per prompt and seed
Log = Callable[[str], object]


# --- generation ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Sampler:
    """One generation setting: every prompt once per seed, the prompts of a seed batched."""

    steps: int
    guidance_scale: float
    num_frames: int
    size: int
    seeds: tuple[int, ...]
    negative_prompt: str = NEGATIVE_PROMPT

    def __call__(self, pipe, prompts: Sequence[str], motion_scale: float = 1.0) -> Generated:

        out: Generated = []
        for seed in self.seeds:
            video = pipe(
                list(prompts),
                negative_prompt=self.negative_prompt,
                num_frames=self.num_frames,
                height=self.size,
                width=self.size,
                num_inference_steps=self.steps,
                guidance_scale=self.guidance_scale,
                seed=seed,
                progress=False,
                motion_scale=motion_scale,
            )
            frames = (video.frames.clamp(0, 1) * 255).round().to(torch.uint8)
            frames = frames.permute(0, 2, 3, 4, 1).cpu().numpy()  # (b, f, h, w, 3)
            out += list(zip(prompts, frames))
        return out


class _Pipelines:
    """Each model combination loaded once, kept while needed and freed with ``release``."""

    def __init__(self, device: str, log: Log):
        self.device = device
        self.log = log
        self._pipes: dict[str, object] = {}
        self.loads: list[str] = []

    def get(self, key: str, unet_folder: Path | None = None, **load):
        if key not in self._pipes:
            self.log(f"[evaluate] loading {key}")
            pipe = AnimationPipeline.load(**load, device=self.device)
            if unet_folder is not None:  # the baseline's own fine-tuned image layers
                sd = UNet2DConditionModel.from_pretrained(unet_folder).state_dict()
                pipe.unet.unet.load_state_dict(sd)
            self._pipes[key] = pipe
            self.loads.append(key)
        return self._pipes[key]

    def release(self, key: str) -> None:
        if self._pipes.pop(key, None) is not None:
            gc.collect()
            if str(self.device).startswith("cuda"):
                torch.cuda.empty_cache()

    def close(self) -> None:
        for key in list(self._pipes):
            self.release(key)


def _texts(generated: Generated) -> list[str]:
    return [t for t, _ in generated]


def _clips(generated: Generated) -> list[Clip]:
    return [c for _, c in generated]


def _row(model: str, style: str | None, generated: Generated, stills: Mapping | None, start: float):
    metrics = clip_metrics(_clips(generated), _texts(generated))
    reference = metrics if stills is None else stills
    return {
        "status": "ok",
        "model": model,
        "style": style,
        **metrics,
        **domain_similarity(metrics, reference, style),
        "seconds": round(time.perf_counter() - start, 1),
    }


def _guarded(label: str, log: Log, fn: Callable[[], dict]) -> dict:
    """Run one row; a failure is recorded in its status rather than ending the evaluation."""
    try:
        return fn()
    except Exception as e:  # an extra that does not load or run must not cost the others
        log(f"[evaluate] {label}: failed: {type(e).__name__}: {e}")
        return {"status": f"error: {type(e).__name__}: {e}"}


def _style_of(name: str, entry: Mapping) -> str | None:
    """The detector style of a personal model: the manifest's ``style``, else from the name."""
    if entry.get("style"):
        return entry["style"]
    return next((s for s in STYLES if name.startswith(s)), None) or next(
        (s for s in STYLES if s in name), None
    )


def _kind_of_motion_lora(name: str, info: Mapping) -> str | None:
    if info.get("kind"):
        return info["kind"]
    lowered = name.lower()
    return "zoom-in" if "zoom" in lowered else "pan-left" if "pan" in lowered else None


def lora_rank(path: str | os.PathLike) -> int | None:
    """Rank of a LoRA file (rows of its first down/A matrix); None if it cannot be read."""
    try:
        sd = load_state_dict(path)
    except Exception:
        return None
    for key, value in sd.items():
        if value.ndim >= 2 and any(s in key for s in ("down.weight", "lora_A", "lora_down")):
            return int(value.shape[0])
    return None


def _builtin_names() -> tuple[tuple[str, ...], tuple[str, ...], int]:
    """Personal styles and MotionLoRAs the built-in model ships, and its MotionLoRA clip count."""
    return (*STYLES, f"{STYLE_LORA}-lora"), MOTION_LORAS, DATA["motion_lora_clips"]


def _adapter_off(main: Mapping) -> dict:
    return {**main, "model": "base + motion module (adapter 0.0)", "adapter_scale": 0.0}


def _camera_motion(generated: Generated) -> dict:
    return camera_motion(_clips(generated), _texts(generated))


def _motion_lora_entries(
    manifest: Mapping, extras: Mapping | None, expected: Sequence[str], builtin_clips: int
) -> dict[str, tuple[Path | None, dict, str]]:
    """``{name: (file, info, source)}``: the built-in MotionLoRAs expected or shipped (file None
    when not installed), then the extras."""
    entries: dict[str, tuple[Path | None, dict, str]] = {}
    shipped = manifest.get("motion_loras", {})
    for name in dict.fromkeys([*expected, *shipped]):
        path = builtin.motion_lora(name) if name in shipped else None
        info = {k: v for k, v in shipped.get(name, {}).items() if k != "file"}
        entries[name] = (path, {"clips": builtin_clips, **info}, "builtin")
    for name, (path, info) in (extras or {}).items():
        entries[name] = (Path(path), dict(info), "extra")
    return entries


def _camera_effects(
    kind: str | None,
    on: Mapping[int, Generated],
    off: Mapping[int, Generated],
    pooled: Sequence[int],
    camera_seeds: Sequence[int],
) -> dict:
    """A MotionLoRA's row from its clips per seed at strength 1 (``on``) and 0 (``off``): the
    metrics over the ``pooled`` seeds, and its effect at each of ``camera_seeds`` alone."""
    strength = {
        key: _camera_motion([g for s in pooled for g in gens[s]])
        for key, gens in (("1.0", on), ("0.0", off))
    }
    by_seed = {
        str(s): camera_effect(kind, _camera_motion(on[s]), _camera_motion(off[s]))
        for s in camera_seeds
    }
    return {
        "status": "ok",
        "strength": strength,
        "effect": camera_effect(kind, strength["1.0"], strength["0.0"]),
        "effect_by_seed": by_seed,
        "seeds_in_direction": sum(bool(v) for v in by_seed.values()),
    }


# --- the evaluation -----------------------------------------------------------------------

BASE = "base + motion module"


@dataclass
class _Evaluation:
    """One evaluation's sampler, prompts and models, and its frame-by-frame and image-layer
    baseline rows, filled in as the rows they belong to are measured."""

    sample: _Sampler
    prompts: Sequence[str]
    pipes: _Pipelines
    log: Log
    baseline: tuple | None  # `builtin.baseline()`: (fine-tuned UNet folder, motion module)
    frame_by_frame: dict[str, dict] = field(default_factory=dict)
    image_layers: dict[str, dict] = field(default_factory=dict)

    def with_stills(self, key: str, name: str, style: str | None, **load) -> dict:
        """The row of model ``key`` and, as ``name``'s frame-by-frame row, its own stills."""
        pipe = self.pipes.get(key, **load)
        t = time.perf_counter()
        stills = self.sample(pipe, self.prompts, motion_scale=0.0)
        self.frame_by_frame[name] = _row(f"{name}, frame by frame", style, stills, None, t)
        del stills
        t = time.perf_counter()
        return _row(key, style, self.sample(pipe, self.prompts), self.frame_by_frame[name], t)

    def against_stills(self, key: str, name: str, style: str | None, **load) -> dict:
        """The row of model ``key``, its domain measured against ``name``'s stills."""
        pipe = self.pipes.get(key, **load)
        t = time.perf_counter()
        return _row(key, style, self.sample(pipe, self.prompts), self.frame_by_frame[name], t)

    def main_row(self) -> dict:
        self.log(f"[evaluate] main: {len(self.prompts)} prompts x {len(self.sample.seeds)} seeds")
        return self.with_stills(BASE, "base", "plain")

    def motion_lora_rows(
        self,
        entries: Mapping[str, tuple[Path | None, dict, str]],
        camera: Mapping[str, Sequence[str]],
        camera_seeds: Sequence[int],
    ) -> dict:
        """Every MotionLoRA attached to the base in turn, at strength 1 and 0 on camera prompts,
        at the evaluation's seeds (pooled) and at each of ``camera_seeds`` alone; the strength-0
        clips of a prompt set and seed are generated once."""
        pipe = self.pipes.get(BASE)
        seeds = tuple(dict.fromkeys([*self.sample.seeds, *camera_seeds]))
        off_cache: dict[tuple, Generated] = {}  # strength 0 = no MotionLoRA: shared by all
        rows = {}
        for name, (path, info, source) in entries.items():
            kind = _kind_of_motion_lora(name, info)
            row: dict = {"source": source, "kind": kind, "rank": info.get("rank"), "info": info}
            row["clips"] = info.get("clips")
            if path is None or not path.exists():
                rows[name] = {"status": SKIPPED, **row}
                continue
            row["file"] = str(path)
            if row["rank"] is None:
                row["rank"] = lora_rank(path)
            every = [p for v in camera.values() for p in v]
            prompts = tuple(camera[kind] if kind in camera else every)

            def measure(name=name, path=path, kind=kind, prompts=prompts) -> dict:
                self.log(
                    f"[evaluate] MotionLoRA {name} ({kind}) at strength 1 and 0, seeds {seeds}"
                )
                on = self.on_and_off(pipe, name, path, prompts, seeds, off_cache)
                off = {s: off_cache[prompts, s] for s in seeds}
                return _camera_effects(kind, on, off, self.sample.seeds, camera_seeds)

            rows[name] = {**row, **_guarded(f"MotionLoRA {name}", self.log, measure)}
        return rows

    def on_and_off(self, pipe, name: str, path: Path, prompts: tuple, seeds, off_cache) -> dict:
        """Clips per seed with the MotionLoRA at strength 1; those at 0 (no MotionLoRA) go into
        ``off_cache`` under ``(prompts, seed)`` unless there already."""
        label = pipe.add_motion_lora(path, 1.0, name=f"evaluate:{name}")
        try:
            on = {s: replace(self.sample, seeds=(s,))(pipe, prompts) for s in seeds}
            pipe.set_motion_lora_strength(label, 0.0)
            for s in seeds:
                if (prompts, s) not in off_cache:
                    off_cache[prompts, s] = replace(self.sample, seeds=(s,))(pipe, prompts)
        finally:
            pipe.remove_motion_lora(label)
        return on

    def adapter_rows(self, main: Mapping) -> dict:
        """The domain adapter merged at 1.0 against 0.0 (the main row)."""
        rows = {"1.0": {"status": SKIPPED}, "0.0": _adapter_off(main)}
        adapter = builtin.adapter()
        if adapter is None:
            return rows
        key = "base + adapter 1.0 + motion module"

        def row() -> dict:
            self.log("[evaluate] domain adapter at 1.0")
            measured = self.against_stills(key, "base", "plain", adapter=(adapter, 1.0))
            return {**measured, "adapter_scale": 1.0}

        rows["1.0"] = _guarded("adapter", self.log, row)
        self.pipes.release(key)
        return rows

    def personal_rows(self, manifest: Mapping, expected: Sequence[str]) -> dict:
        shipped = manifest.get("personal", {})
        return {
            name: self.personal_row(name, shipped.get(name))
            for name in dict.fromkeys([*expected, *shipped])
        }

    def personal_row(self, name: str, entry: Mapping | None) -> dict:
        """A personal model's row; its frame-by-frame row and the image-layer baseline in it
        go into theirs."""
        if entry is None:
            skipped = {"status": SKIPPED}
            self.frame_by_frame[name] = self.image_layers[name] = skipped
            return skipped
        style = _style_of(name, entry)
        kind, path = builtin.personal(name)
        load = {"checkpoint": {"personal": path}, "lora": {"loras": [(path, 1.0)]}}.get(kind)
        if load is None or not Path(path).exists():
            status = SKIPPED if load is not None else f"skipped: unknown kind {kind!r}"
            skipped = {"status": status}
            self.frame_by_frame[name] = self.image_layers[name] = skipped
            return skipped
        key = f"{name} + motion module"

        def rows() -> dict:
            self.log(f"[evaluate] personal {name} ({style})")
            return self.with_stills(key, name, style, **load)

        row = {"kind": kind, **_guarded(name, self.log, rows)}
        self.frame_by_frame.setdefault(name, {"status": row["status"]})
        self.pipes.release(key)
        self.image_layers[name] = self.baseline_in(name, style, load)
        return row

    def baseline_in(self, name: str, style: str | None, load: Mapping) -> dict:
        """The image-layer-trained motion module in personal model ``name``."""
        if self.baseline is None:
            return {"status": SKIPPED}
        if self.frame_by_frame[name]["status"] != "ok":
            return {"status": "skipped: personal model failed"}
        key = f"{name} + image-layer-trained motion module"
        motion_module = self.baseline[1]

        def row() -> dict:
            self.log(f"[evaluate] baseline motion module in {name}")
            return self.against_stills(key, name, style, motion_module=motion_module, **load)

        measured = _guarded(key, self.log, row)
        self.pipes.release(key)
        return measured

    def native_baseline(self) -> dict:
        """The image-layer-trained motion module on its own fine-tuned UNet."""
        if self.baseline is None or not Path(self.baseline[0]).exists():
            return {"status": SKIPPED}
        key = "fine-tuned base + image-layer-trained motion module"
        unet, motion_module = self.baseline

        def row() -> dict:
            self.log("[evaluate] baseline motion module with its fine-tuned UNet")
            load = {"unet_folder": unet, "motion_module": motion_module}
            return self.against_stills(key, "base", "plain", **load)

        measured = _guarded(key, self.log, row)
        self.pipes.release(key)
        return measured


def _camera(quick: bool, seeds: tuple[int, ...], camera_seeds: Sequence[int] | None) -> tuple:
    """The camera prompts per MotionLoRA kind, and the seeds a MotionLoRA is judged at."""
    camera = {k: v[:1] if quick else v for k, v in CAMERA_PROMPTS.items()}
    if camera_seeds is None:
        camera_seeds = seeds if quick else CAMERA_SEEDS
    return camera, tuple(int(s) for s in camera_seeds)


def _settings_record(sample: _Sampler, prompts, camera, camera_seeds, quick, device) -> dict:
    return {
        "steps": sample.steps,
        "guidance_scale": sample.guidance_scale,
        "num_frames": sample.num_frames,
        "height": sample.size,
        "width": sample.size,
        "seeds": list(sample.seeds),
        "prompts": list(prompts),
        "camera_prompts": {k: list(v) for k, v in camera.items()},
        "camera_seeds": list(camera_seeds),
        "negative_prompt": sample.negative_prompt,
        "quick": quick,
        "device": str(device),
    }


def _model_record(manifest: Mapping) -> dict:
    model = builtin_model()
    return {
        "trained": model.trained,
        "base": str(model.base),
        "motion_module": str(model.motion_module),
        "manifest": manifest,
    }


def evaluate(
    steps: int = STEPS,
    guidance_scale: float = GUIDANCE_SCALE,
    num_frames: int = NUM_FRAMES,
    quick: bool = False,
    num_prompts: int | None = None,
    seeds: Sequence[int] | None = None,
    progress: Log | None = print,
    extra_motion_loras: Mapping[str, tuple[str | os.PathLike, Mapping]] | None = None,
    device: str | None = None,
    size: int = SIZE,
    camera_seeds: Sequence[int] | None = None,
) -> dict:
    """Generate with the built-in model and its extras and measure them (module docstring).

    ``quick``: 2 prompts, 1 seed, 1 camera prompt per MotionLoRA. ``num_prompts``: the first N
    prompts only. ``seeds`` overrides the seeds.
    ``progress``: called with one line per step (None: silent). ``extra_motion_loras``:
    ``{name: (path, info)}`` with info such as ``{"rank": 2, "clips": 10}`` (and optionally
    ``"kind"``: "zoom-in" or "pan-left", else read from the name), reported beside the built-in
    MotionLoRAs. ``camera_seeds``: the seeds each MotionLoRA's effect is judged at one by one
    (default ``CAMERA_SEEDS``; quick: the evaluation's seeds). Returns ``{"settings", "model",
    "main", "personal", "baselines": {"frame_by_frame", "image_layers"}, "adapter",
    "motion_loras", "seconds"}``.
    """
    log: Log = progress or (lambda _: None)
    start = time.perf_counter()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    prompts = QUICK_PROMPTS if quick else PROMPTS[:num_prompts]
    seeds = tuple(int(s) for s in (seeds if seeds is not None else QUICK_SEEDS if quick else SEEDS))
    camera, camera_seeds = _camera(quick, seeds, camera_seeds)
    sample = _Sampler(steps, guidance_scale, num_frames, size, seeds)
    manifest = builtin.manifest()
    personal, motion_loras, motion_lora_clips = _builtin_names()
    entries = _motion_lora_entries(manifest, extra_motion_loras, motion_loras, motion_lora_clips)
    results = {
        "settings": _settings_record(sample, prompts, camera, camera_seeds, quick, device),
        "model": _model_record(manifest),
    }
    run = _Evaluation(sample, prompts, _Pipelines(device, log), log, builtin.baseline())
    try:
        results["main"] = run.main_row()
        results["motion_loras"] = run.motion_lora_rows(entries, camera, camera_seeds)
        run.pipes.release(BASE)
        results["adapter"] = run.adapter_rows(results["main"])
        results["personal"] = run.personal_rows(manifest, personal)
        image_layers = {"base": run.native_baseline(), **run.image_layers}
        results["baselines"] = {"frame_by_frame": run.frame_by_frame, "image_layers": image_layers}
    finally:
        run.pipes.close()
    results["seconds"] = round(time.perf_counter() - start, 1)
    log(f"[evaluate] done in {results['seconds']} s")
    order = ("settings", "model", "main", "personal", "baselines", "adapter", "motion_loras")
    return {**{k: results[k] for k in order}, "seconds": results["seconds"]}


def run(args: argparse.Namespace) -> dict:
    if getattr(args, "student", None) is not None:
        return run_comparison(args)
    results = evaluate(
        steps=args.steps,
        guidance_scale=args.guidance_scale,
        num_frames=args.frames,
        quick=args.quick,
        num_prompts=args.prompts,
        seeds=args.seeds,
        camera_seeds=args.camera_seeds,
        extra_motion_loras=dict(args.extra_motion_lora),
        device=args.device,
    )
    print(format_table(results))
    if args.out:
        print(f"results: {save_results(results, args.out)}")
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(p)
    run(p.parse_args(argv))


if __name__ == "__main__":
    main()
