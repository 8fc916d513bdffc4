"""The `distill` stage: consistency distillation of a motion module (AnimateLCM's recipe).

The math is checked against diffusers' own samplers: the solver grid and boundary scalings are
the `LCMScheduler`'s, the consistency function is its `denoised`, and the teacher's guided step is
`DDIMScheduler.step` on the guided noise. The stage itself really trains the tiny random model
(no mocks): it changes only the student (teacher and image model bit-identical), keeps the target
an EMA of the student, resumes to the same weights, and its output loads with
`AnimationPipeline.load` and is sampled by `--preset auto` with the LCM sampler at its step count.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler
from test_training import (  # the training tests' data, configs and forked-child runner
    FRAMES,
    SIZE,
    Data,
    assert_same_tensors,
    config,
    data,  # noqa: F401 - the session fixture
    in_child,
    load_tensors,
    read_metrics,
)

from animatediff.schedule import ANIMATEDIFF_SCHEDULE
from animatediff.training.config import parse_config
from animatediff.training.distill import ConsistencySolver, consistency_loss, guided_step
from animatediff.training.loss import make_noise_scheduler

SOLVER_STEPS = 50


def lcm_scheduler() -> LCMScheduler:
    """The LCM sampler as the `animatelcm` preset builds it (AnimateDiff's linear schedule)."""
    from animatediff.pipeline.schedulers import make_scheduler

    return make_scheduler("lcm", set_alpha_to_one=False)


def solver(prediction_type: str = "epsilon") -> ConsistencySolver:
    noise = parse_config(
        {"stage": "motion", "output_dir": "o", "data": {"videos": "x"}}
    ).train.noise
    return ConsistencySolver(
        make_noise_scheduler(noise).alphas_cumprod, SOLVER_STEPS, 10.0, prediction_type
    )


# -- 1. the math, against diffusers ---------------------------------------------------------------
def test_solver_grid_and_scalings_are_the_lcm_samplers():
    lcm = lcm_scheduler()
    lcm.set_timesteps(SOLVER_STEPS)  # all 50 points of its original grid
    s = solver()
    assert s.timesteps.tolist() == sorted(lcm.timesteps.tolist())
    assert s.timesteps[0] == 19 and s.timesteps[-1] == 999 and s.skip == 20
    c_skip, c_out = s.boundary(s.timesteps, ndim=1)
    for t, a, b in zip(s.timesteps.tolist(), c_skip.tolist(), c_out.tolist()):
        ref_skip, ref_out = lcm.get_scalings_for_boundary_condition_discrete(t)
        assert a == pytest.approx(ref_skip, rel=1e-12) and b == pytest.approx(ref_out, rel=1e-12)
    assert s.boundary(torch.tensor([0]), 1) == (1.0, 0.0)  # f(x, 0) = x


@pytest.mark.parametrize("steps", [4, 8])
def test_consistency_function_is_the_lcm_samplers_denoised(steps: int):
    """At every timestep the student will be sampled at, f(x, t) is exactly what LCMScheduler
    takes as the clean sample (before it re-noises for the next step)."""
    lcm = lcm_scheduler()
    lcm.set_timesteps(steps)
    s = solver()
    gen = torch.Generator().manual_seed(0)
    sample = torch.randn(1, 4, 3, 8, 8, generator=gen)
    for t in lcm.timesteps:
        output = torch.randn(sample.shape, generator=gen)
        ref = lcm.step(output, t, sample).denoised
        mine = s.consistency(output, t.view(1), sample)
        torch.testing.assert_close(mine, ref, rtol=1e-5, atol=1e-5)
        sample = torch.randn(sample.shape, generator=gen)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_guided_teacher_step_is_ddim_on_the_guided_prediction(prediction_type: str):
    """The teacher's step from t to t - 20: DDIM (eta 0, AnimateDiff's schedule) applied to the
    classifier-free-guided prediction `uncond + w (cond - uncond)`, per sample. Below the first
    grid point the solver lands on t = 0 (alpha_bar[0], as diffusers' LCM distillation does):
    DDIM with `set_alpha_to_one=False`."""
    schedule = {**ANIMATEDIFF_SCHEDULE, "prediction_type": prediction_type}
    ddim = DDIMScheduler(**schedule, set_alpha_to_one=False)
    ddim.set_timesteps(SOLVER_STEPS)
    s = solver(prediction_type)
    gen = torch.Generator().manual_seed(1)
    t = torch.tensor([19, 399, 999])  # the first grid point steps to t = 0
    w = torch.tensor([1.0, 4.5, 7.5])
    noisy = torch.randn(3, 4, 2, 8, 8, generator=gen)
    cond, uncond = torch.randn(2, *noisy.shape, generator=gen)
    x_prev = guided_step(lambda x, tt: (cond, uncond), s, noisy, t, w)
    for i in range(3):
        guided = uncond[i] + w[i] * (cond[i] - uncond[i])
        ref = ddim.step(guided[None], int(t[i]), noisy[i][None]).prev_sample[0]
        torch.testing.assert_close(x_prev[i], ref, rtol=1e-5, atol=1e-5)


def test_loss_draws_are_per_sample_and_reach_every_grid_point():
    """Each sample's noise, timestep and guidance come from its own generator: the loss of a
    sample does not depend on the batch it is in; timesteps cover the grid, guidance its range."""
    s = solver()
    cfg = parse_config(
        {
            "stage": "distill",
            "motion_module": "m",
            "output_dir": "o",
            "data": {"videos": "x"},
            "distill": {"guidance_scale": [2, 8], "loss": "l2"},
        }
    ).distill
    scheduler = make_noise_scheduler(
        parse_config({"stage": "motion", "output_dir": "o", "data": {"videos": "x"}}).train.noise
    )
    seen_t, seen_w = [], []

    def teacher(x, t):
        seen_t.extend(t.tolist())
        return x * 0.1, x * 0.2

    def loss_of(batch, seeds):
        gens = [torch.Generator().manual_seed(k) for k in seeds]
        return consistency_loss(
            lambda x, t: x * 0.3, teacher, lambda x, t: x * 0.4, batch, scheduler, s, cfg, gens
        )

    latents = torch.randn(2, 4, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    pair = loss_of(latents, [10, 11])
    alone = (loss_of(latents[:1], [10]) + loss_of(latents[1:], [11])) / 2
    torch.testing.assert_close(pair, alone)
    from animatediff.training.distill import draw

    for k in range(400):
        _, _, w = draw((1, 4, 2, 4, 4), s, cfg, [torch.Generator().manual_seed(k)], 0.0)
        seen_w.append(float(w))
    seen_t.clear()
    loss_of(torch.randn(400, 4, 1, 2, 2), range(400))
    assert set(seen_t) <= set(s.timesteps.tolist()) and len(set(seen_t)) > 40
    assert 2 <= min(seen_w) < 2.2 and 7.8 < max(seen_w) <= 8


# -- 2. the stage on the tiny random model ----------------------------------------------------------
def distill_config(out: Path, data: Data, steps: int = 2, **extra) -> dict:  # noqa: F811 - the fixture
    """A tiny distill config: the random model's own motion module as the teacher."""
    from animatediff.builtin.model import random_model

    extra.setdefault("checkpoint", {"every": 0})
    return config(
        "distill",
        out,
        data.overfit,
        steps=steps,
        batch_size=2,
        motion_module=str(random_model().motion_module),
        **extra,
    )


def _one_step(cfg: dict) -> dict:
    """In the child: one distill step; every part of the model before and after."""
    from animatediff.training import Trainer, parse_config

    trainer = Trainer(parse_config(cfg))
    model = trainer.unwrapped

    def snapshot() -> dict[str, dict[str, torch.Tensor]]:
        parts = {
            "teacher": model.teacher_motion.state_dict(),
            "student": model.motion.state_dict(),
            "target": model.target_motion.state_dict(),
            "unet": model.unet2d.state_dict(),
            "lora": model.lora.layers.state_dict(),
            "target_lora": model.target_lora.layers.state_dict(),
        }
        return {k: {n: v.detach().clone() for n, v in d.items()} for k, d in parts.items()}

    before = snapshot()
    trainer.fit()
    return {"before": before, "after": snapshot()}


def test_distill_trains_the_student_and_keeps_the_target_its_ema(data: Data, tmp_path: Path):  # noqa: F811 - the fixture
    """One step with an image LoRA: the teacher motion module and the image UNet stay
    bit-identical; student and LoRA move; the target is `0.95 * before + 0.05 * student`."""
    cfg = distill_config(tmp_path / "out", data, steps=1, lr=1e-3, distill={"lora_rank": 2})
    run = in_child(_one_step, cfg)
    before, after = run["before"], run["after"]
    assert_same_tensors(before["teacher"], after["teacher"], "teacher motion module")
    assert_same_tensors(before["unet"], after["unet"], "image UNet")
    assert_same_tensors(before["student"], before["teacher"], "student at the start")
    moved = [
        k for k in after["student"] if not torch.equal(after["student"][k], before["student"][k])
    ]
    assert len(moved) > len(after["student"]) // 2, f"only {len(moved)} student tensors moved"
    assert any(not torch.equal(after["lora"][k], before["lora"][k]) for k in after["lora"])
    for part, student in (("target", "student"), ("target_lora", "lora")):
        for k, value in after[part].items():
            ema = 0.95 * before[part][k] + 0.05 * after[student][k]
            torch.testing.assert_close(value, ema, rtol=1e-6, atol=1e-7)


def _stopped_after_first_step(cfg: dict) -> None:
    from animatediff.training import Trainer, parse_config

    trainer = Trainer(parse_config(cfg))
    trainer._stop_requested = True  # as Ctrl-C does: finish the step, checkpoint, stop
    try:
        trainer.fit()
    except KeyboardInterrupt:
        return
    raise AssertionError("the run did not stop")


def test_distill_resumes_to_the_same_weights(data: Data, tmp_path: Path):  # noqa: F811 - the fixture
    """Stopped after step 1 and resumed: the student, its LoRA and the losses of every step are
    bitwise those of an uninterrupted 3-step run (the target and the EMA of the weights are in
    the checkpoint too, or the later steps would differ)."""
    from animatediff.training import train

    def cfg(out: Path) -> dict:
        extra = {"distill": {"lora_rank": 2}, "train": {"ema_decay": 0.5}}
        return distill_config(out, data, steps=3, lr=1e-3, **extra)

    in_child(train, cfg(tmp_path / "whole"))
    in_child(_stopped_after_first_step, cfg(tmp_path / "parts"))
    ckpt = tmp_path / "parts" / "checkpoints" / "step-00000001"
    assert {"target.safetensors", "ema.safetensors"} <= {p.name for p in ckpt.iterdir()}
    in_child(train, cfg(tmp_path / "parts"), resume=True)
    for name in ("motion_module.safetensors", "distill_lora.safetensors"):
        a = load_tensors(tmp_path / "whole" / name)
        b = load_tensors(tmp_path / "parts" / name)
        assert_same_tensors(a, b, f"resumed vs uninterrupted {name}")
    losses = [[r["loss"] for r in read_metrics(tmp_path / run)] for run in ("whole", "parts")]
    assert losses[0] == losses[1] and len(losses[0]) == 3


def test_distilled_module_loads_and_samples_with_the_lcm_preset(data: Data, tmp_path: Path):  # noqa: F811 - the fixture
    """The output loads with `AnimationPipeline.load`; its metadata names the release, so
    `preset="auto"` picks the LCM sampler at the distilled step count; it generates."""
    from animatediff.checkpoints.detect import describe
    from animatediff.options import Options
    from animatediff.pipeline import AnimationPipeline
    from animatediff.training import train

    out = tmp_path / "out"
    results = in_child(
        train, distill_config(out, data, steps=1, distill={"num_inference_steps": 6})
    )
    assert [Path(p).name for p in results] == [
        "motion_module.safetensors",
        "motion_module_diffusers",
    ]
    from test_training import random_base

    for path in (out / "motion_module.safetensors", out / "motion_module_diffusers"):
        pipe = AnimationPipeline.load(base=random_base(), motion_module=path)
        assert pipe.motion_release.preset == "animatelcm" and pipe.motion_release.steps == 6
        sampling = pipe.with_preset(Options.build({"preset": "auto"})).sampling
        assert sampling.scheduler == "lcm" and sampling.num_inference_steps == 6
    assert describe(out / "motion_module.safetensors")["preset"] == "animatelcm"
    video = pipe(
        "a red square",
        num_frames=FRAMES,
        height=SIZE,
        width=SIZE,
        preset="auto",
        seed=0,
        progress=False,
    )
    assert video.frames.shape[-4:] == (3, FRAMES, SIZE, SIZE) and torch.isfinite(video.frames).all()


def test_validation_samples_the_student_as_preset_auto_will():
    from animatediff.pipeline.presets import PRESETS
    from animatediff.training.report import sampling_settings

    base = {"output_dir": "o", "data": {"videos": "x"}, "motion_module": "m"}
    student = parse_config({**base, "stage": "distill", "distill": {"num_inference_steps": 6}})
    settings = sampling_settings(student)
    assert settings["scheduler"] == "lcm" and settings["num_inference_steps"] == 6
    assert settings["guidance_scale"] == PRESETS["animatelcm"].guidance_scale
    motion = parse_config({**base, "stage": "motion", "validation": {"steps": 9}})
    assert sampling_settings(motion) == {"num_inference_steps": 9, "guidance_scale": 7.5}


def test_a_non_finite_loss_stops_training_with_one_line(data: Data, tmp_path: Path):  # noqa: F811 - the fixture
    """The loss is checked at every step: NaN stops the run with a TrainingDiverged (a
    UserError: one line, exit 2 on the command line) naming the step."""
    from animatediff.training import Trainer, TrainingDiverged, parse_config

    def diverge() -> str:
        trainer = Trainer(parse_config(distill_config(tmp_path / "out", data)))
        try:
            trainer._gather(torch.tensor(float("nan")), {"skipped": [], "captions": ["a"]})
        except TrainingDiverged as e:
            return str(e)
        raise AssertionError("a NaN loss was accepted")

    message = in_child(diverge)
    assert "step 1" in message and "nan" in message and "\n" not in message


@pytest.mark.parametrize("name, lora_rank", [("distill.yaml", 0), ("distill-lora.yaml", 8)])
def test_the_documented_distillation_configs_are_valid(name: str, lora_rank: int):
    """docs/distill/*.yaml (the recipes of the two evaluated students) parse as written."""
    from animatediff.training import load_config

    cfg = load_config(Path(__file__).resolve().parents[1] / "docs" / "distill" / name)
    assert cfg.stage == "distill" and cfg.distill.num_inference_steps == 4
    assert cfg.distill.guidance_scale == (7.5, 7.5) and cfg.data.num_frames == 16
    assert cfg.distill.lora_rank == lora_rank


# -- 3. the teacher/student comparison of `animatediff evaluate --student` ----------------------------
def test_holds_is_within_ten_percent_or_better():
    from animatediff.world.compare import METRICS, holds

    teacher = {key: 0.5 for _, key, _ in METRICS}
    teacher["watermark_rate"] = 0.2
    assert all(holds(dict(teacher), teacher).values())
    worse = {**teacher, "text_alignment": 0.44, "watermark_rate": 0.23}
    better = {**teacher, "text_alignment": 0.46, "colour_alignment": 0.9, "watermark_rate": 0.21}
    assert [k for k, ok in holds(worse, teacher).items() if not ok] == [
        "text_alignment",
        "watermark_rate",
    ]
    assert all(holds(better, teacher).values())
    assert holds({**teacher, "motion_alignment": None}, teacher)["motion_alignment"] is False


def test_compare_runs_teacher_and_student_side_by_side(tmp_path: Path):
    """`compare` end to end on the built-in model, tiny (2 prompts, 4 frames, 2 teacher steps):
    the student (here the teacher's own module, saved as a distilled 1-step release) is sampled
    with the LCM sampler through `preset="auto"`, the teacher with DDIM; every metric, the time
    per animation and the verdicts are there, and the table prints them."""
    from animatediff.builtin.model import builtin_model
    from animatediff.checkpoints.fewstep import Release, release_metadata
    from animatediff.checkpoints.motion import load_motion_module, save_motion_module
    from animatediff.world.compare import METRICS, compare, format_comparison

    student = tmp_path / "student.safetensors"
    release = Release("AnimateDiff consistency-distilled 1-step", "animatelcm", 1)
    module = load_motion_module(builtin_model().motion_module)
    save_motion_module(module, student, extra_metadata=release_metadata(release))
    from animatediff.builtin import adapter

    lora = adapter()  # stands in for a distilled image-layer LoRA: same layout, same layers
    results = compare(
        student, student_steps=(1,), teacher_steps=2, num_prompts=2, seeds=(0,), num_frames=4,
        progress=None, student_adapter=lora,
    )  # fmt: skip
    teacher, pupil = results["rows"]["teacher"], results["rows"]["student_1"]
    assert (teacher["scheduler"], teacher["steps"], teacher["guidance_scale"]) == ("ddim", 2, 7.5)
    assert (pupil["scheduler"], pupil["steps"]) == ("lcm", 1)
    for row in (teacher, pupil):
        assert row["clips"] == 2 and row["seconds_per_animation"] > 0
        assert all(key in row for _, key, _ in METRICS)
    assert set(pupil["holds"]) == {key for _, key, _ in METRICS} and pupil["speedup"] > 0
    table = format_comparison(results)
    assert "student 1 steps" in table and "s / animation" in table and "lcm" in table
    assert results["student_adapter"] == (None if lora is None else str(lora))


@pytest.mark.slow
def test_distill_two_processes_match_one(data: Data, tmp_path: Path):  # noqa: F811 - the fixture
    """Data-parallel distillation: two gloo processes with batch 1 follow one process with batch
    2: the same loss at every step (same clips, noise, timesteps, guidance; to float rounding)
    and the same student up to AdamW's amplified float noise. Near-zero gradients (many under the
    pseudo-Huber loss) become steps of up to lr whose sign the summation order decides, so a few
    hundred of 1.5 million elements differ by up to ~lr; the mean difference stays 500x below lr,
    where processes that trained apart differ by about lr everywhere."""
    import os

    from test_training import _finish, _launch, describe, write_yaml

    from animatediff.training import train

    lr = 1e-3

    def cfg(out: Path, batch_size: int) -> dict:
        return {**distill_config(out, data, steps=3, lr=lr), "train": {
            **distill_config(out, data)["train"], "steps": 3, "batch_size": batch_size, "learning_rate": lr
        }}  # fmt: skip

    in_child(train, cfg(tmp_path / "one", 2))
    cfg_file = write_yaml(tmp_path / "two.yaml", cfg(tmp_path / "two", 1))
    cmd = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1"]
    cmd += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    cmd += ["--main_process_port", str(29700 + os.getpid() % 200)]
    cmd += ["-m", "animatediff.cli.main", "train", str(cfg_file)]
    env = {"ACCELERATE_USE_CPU": "true", "ANIMATEDIFF_TRACEBACK_AFTER": "300"}
    proc = _finish(_launch(cmd, tmp_path, **env))
    assert proc.returncode == 0, describe(proc)
    one, two = (read_metrics(tmp_path / run) for run in ("one", "two"))
    assert [r["step"] for r in two] == [1, 2, 3]
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), (a, b)
    a = load_tensors(tmp_path / "one" / "motion_module.safetensors")
    b = load_tensors(tmp_path / "two" / "motion_module.safetensors")
    diffs = torch.cat([(a[k].double() - b[k].double()).abs().flatten() for k in a])
    assert diffs.mean() < lr / 100 and diffs.max() < 3 * lr, (diffs.mean(), diffs.max())
