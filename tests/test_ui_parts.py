"""The web UI's parts that need no browser (and no Gradio): the model library, form checks,
uploads, the command/config round trip through the real CLI, the model manager, the queue.

The browser tests are in test_ui.py.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image

from animatediff import AnimationPipeline, builtin
from animatediff.builtin.model import builtin_model
from animatediff.checkpoints.io import CheckpointError, save_state_dict
from animatediff.cli.main import build_parser, main
from animatediff.ui.form import FormReader
from animatediff.ui.jobs import CANCELLED, DONE, FAILED, UserError, Worker
from animatediff.ui.library import ModelLibrary, UnknownModel
from animatediff.ui.models import ModelManager
from animatediff.ui.results import Results
from animatediff.ui.service import Service
from animatediff.ui.settings import NotExpressible, Settings, command_argv, config_entry
from animatediff.ui.uploads import store_image, store_video
from animatediff.video import read_video, save_video

REF = Path(__file__).parent / "data" / "official_tiny"
PROMPT = "a red circle moving on a blue background"


# -- fixtures ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A model folder whose file names say nothing true about their content."""
    d = tmp_path_factory.mktemp("models")
    (d / "loras").mkdir()
    (d / "motion").mkdir()
    model = builtin_model()
    (d / "loras" / "style.safetensors").write_bytes(model.motion_module.read_bytes())
    (d / "loras" / "outline.safetensors").write_bytes(
        builtin.personal("outline-lora")[1].read_bytes()
    )
    (d / "motion" / "camera.ckpt").write_bytes(builtin.motion_lora("zoom-in").read_bytes())
    (d / "broken.safetensors").write_bytes(b"this is not a checkpoint")
    (d / ".hidden.safetensors").write_bytes(builtin.motion_lora("zoom-in").read_bytes())
    (d / "notes.txt").write_text("ignored: not a weight file")
    for name in ("mm_v3.ckpt", "sparsectrl_rgb.ckpt"):
        (d / name).symlink_to(REF / name)
    (d / "tiny-base").symlink_to(REF / "base", target_is_directory=True)
    unet = UNet2DConditionModel.from_pretrained(REF / "base", subfolder="unet")
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(
        unet, conditioning_embedding_out_channels=(8, 16, 16, 32)
    )
    for name, p in controlnet.named_parameters():  # visible residuals, as in test_control.py
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            torch.nn.init.normal_(p, std=0.05)
    controlnet.save_pretrained(d / "controlnet")
    save_state_dict(controlnet.state_dict(), d / "depth.safetensors")
    return d


@pytest.fixture(scope="module")
def library(model_dir) -> ModelLibrary:
    return ModelLibrary([model_dir])


def keys(library: ModelLibrary, category: str) -> set[str]:
    return {key for _, key in library.choices(category)}


def form(**changes) -> dict:
    """The page's default form values (built-in model, small and fast), with changes."""
    values = dict(
        prompt=PROMPT,
        negative_prompt="",
        base="builtin:base",
        motion_module="builtin:motion_module",
        frames=8,
        width=64,
        height=64,
        steps=3,
        guidance_scale=7.5,
        scheduler="ddim",
        preset="",
        seed=3,
        fps=8,
        context_length=16,
        context_overlap=4,
        context_stride=1,
        context_schedule="static",
        context_fuse="pyramid",
        context_views=False,
        freenoise=False,
        freeinit_iterations=0,
        motion_scale=1.0,
        prompt_interpolation="linear",
        adapter_scale=1.0,
        control_scale=1.0,
        strength=0.8,
    )
    return {**values, **changes}


def png(path: Path, color=(200, 30, 30), size=(64, 64)) -> str:
    Image.new("RGB", size, color).save(path)
    return str(path)


# -- the model library ---------------------------------------------------------------------------
def test_library_recognises_models_by_content(library):
    assert "0:loras/style.safetensors" in keys(library, "motion_module")  # not a LoRA
    assert "0:loras/style.safetensors" not in keys(library, "lora")
    assert "0:motion/camera.ckpt" in keys(library, "motion_lora")
    assert "0:loras/outline.safetensors" in keys(library, "lora")
    assert "0:tiny-base" in keys(library, "base")
    assert "0:mm_v3.ckpt" in keys(library, "motion_module")
    assert "0:sparsectrl_rgb.ckpt" in keys(library, "sparsectrl")
    assert {"0:controlnet", "0:depth.safetensors"} <= keys(library, "controlnet")
    everything = set().union(*(keys(library, c) for c in ("base", "lora", "motion_lora", "vae")))
    assert not any("hidden" in k or "notes" in k or "broken" in k for k in everything)
    assert any("broken.safetensors" in s for s in library.skipped)
    # the built-in models are always offered
    assert {"builtin:base"} <= keys(library, "base")
    assert {"builtin:stripes", "builtin:outline-lora"} <= keys(library, "personal")
    assert {"builtin:zoom-in", "builtin:pan-left"} <= keys(library, "motion_lora")


@pytest.mark.parametrize(
    "key",
    [
        "../../etc/passwd",
        "0:../../../etc/passwd",
        "/etc/passwd",
        "0:/etc/passwd",
        "0:loras/style.safetensors",  # exists, but is a motion module, not a LoRA
        "1:loras/outline.safetensors",  # no second folder
        None,
        7,
    ],
)
def test_library_opens_nothing_but_what_it_offers(library, model_dir, key):
    with pytest.raises(UnknownModel, match="not one of the models offered"):
        library.get(key, "lora")
    with pytest.raises(UnknownModel):
        library.get(str(model_dir / "loras" / "outline.safetensors"), "lora")  # a typed path
    if key is not None:  # in the form, no value means no LoRA
        with pytest.raises(UserError, match="not one of the models offered"):
            FormReader(library, model_dir).read(form(lora_1=key))


def test_library_remembers_files_until_they_change(model_dir, tmp_path):
    cache = tmp_path / "scan.json"
    ModelLibrary([model_dir], cache)
    remembered = json.loads(cache.read_text())
    lora = model_dir / "loras" / "outline.safetensors"
    (key,) = [k for k in remembered if k.startswith(f"{lora}|")]
    remembered[key]["kind"] = "MotionLoRA"  # what a restart would believe without reading it
    cache.write_text(json.dumps(remembered))
    assert "0:loras/outline.safetensors" in keys(ModelLibrary([model_dir], cache), "motion_lora")
    copy = tmp_path / "models"
    shutil.copytree(model_dir, copy, symlinks=True)
    (copy / "loras" / "outline.safetensors").write_bytes(lora.read_bytes() + b"")  # new mtime
    changed = ModelLibrary([copy], cache)
    assert "0:loras/outline.safetensors" in keys(changed, "lora")
    assert not any(k.startswith(f"{lora}|") for k in json.loads(cache.read_text()))  # pruned


def test_library_refuses_a_missing_folder(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        ModelLibrary([tmp_path / "nowhere"])


# -- form checks and uploads ---------------------------------------------------------------------
@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(width=100), "width: 100 is not a multiple of 8 (try 96)"),
        (dict(frames=0), "frames: 0 is outside 1 to 1024"),
        (dict(steps="many"), "steps: 'many' is not a number"),
        (dict(guidance_scale=float("nan")), "guidance scale: nan is outside"),
        (dict(scheduler="rm -rf /"), "scheduler: 'rm -rf /' is not one of ddim"),
        (dict(prompt="  "), "prompt: write what the animation should show"),
        (dict(travel=[[99, "a blue square"]]), "prompt travel: frame 99 is outside 0..7"),
        (dict(travel=[[2, ""]]), "prompt travel: frame 2 has no prompt"),
        (dict(control_frames="0, 7"), None),  # frames without images are ignored
        (dict(controlnet_1="0:controlnet"), "ControlNet 1: choose a ControlNet and upload"),
        (dict(seed=-5), "seed: -5 is outside"),
    ],
)
def test_form_names_the_wrong_field(library, tmp_path, changes, message):
    reader = FormReader(library, tmp_path)
    if message is None:
        reader.read(form(**changes))
        return
    with pytest.raises(UserError) as e:
        reader.read(form(**changes))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_form_reads_travel_keyframes_and_seeds(library, tmp_path):
    reader = FormReader(library, tmp_path)
    s = reader.read(form(seed=-1, travel=[[0, "a red circle"], ["", ""], [-1, "a blue square"]]))
    assert 0 <= s.seed < 2**31
    assert s.prompt_argument() == {"0": "a red circle", "-1": "a blue square"}
    assert s.pipeline_kwargs()["prompt_head"] == PROMPT
    both = form(init_image=png(tmp_path / "a.png"), init_video=png(tmp_path / "b.png"))
    with pytest.raises(UserError, match="not both"):
        reader.read(both)
    keyframes = form(control_images=[png(tmp_path / "k.png")])
    with pytest.raises(UserError, match="choose a SparseCtrl encoder"):
        reader.read(keyframes)


def test_uploads_are_checked_by_content_and_size(tmp_path):
    fake = tmp_path / "photo.png"
    fake.write_text("#!/bin/sh\necho not an image\n")
    with pytest.raises(UserError, match="init image: not a readable image"):
        store_image(fake, tmp_path / "stored.png", "init image")
    real = png(tmp_path / "real.jpg")
    with pytest.raises(UserError, match="over the"):
        store_image(real, tmp_path / "stored.png", "init image", limit=100)
    with pytest.raises(UserError, match="larger than 4096"):
        store_image(png(tmp_path / "wide.png", size=(5000, 8)), tmp_path / "w.png", "init image")
    stored = store_image(real, tmp_path / "stored.png", "init image")
    with Image.open(stored) as image, Image.open(real) as source:  # a JPEG, stored as PNG
        assert image.format == "PNG" and image.tobytes() == source.convert("RGB").tobytes()
    with pytest.raises(UserError, match="is not a video type"):
        store_video(fake, tmp_path / "v", "init video")
    corrupt = tmp_path / "clip.mp4"
    corrupt.write_bytes(b"\x00\x00\x00\x18ftypmp42" + bytes(200))
    with pytest.raises(UserError, match="init video: not a readable video"):
        store_video(corrupt, tmp_path / "v", "init video")
    clip = save_video(torch.rand(3, 4, 32, 32), tmp_path / "clip.gif")
    stored = store_video(clip, tmp_path / "v", "init video")
    assert stored.endswith("v.gif") and read_video(stored).shape == (3, 4, 32, 32)


# -- command and config --------------------------------------------------------------------------
def test_command_uses_builtin_names_and_protects_odd_prompts(library, tmp_path):
    s = FormReader(library, tmp_path).read(
        form(
            prompt="-a prompt that looks like a flag",
            personal="builtin:stripes",
            motion_lora_1="builtin:zoom-in",
            motion_lora_1_strength=0.55,
            lora_1="0:loras/outline.safetensors",
            lora_1_strength=0.3,
        )
    )
    argv = command_argv(s)
    assert argv[:2] == ["animatediff", "generate"] and argv[-2:] == ["--", s.prompt]
    assert build_parser().parse_args(argv[1:]).prompt == s.prompt  # after "--": not a flag

    def value(flag: str) -> str:
        return argv[argv.index(flag) + 1]

    assert value("--personal") == "stripes" and value("--motion-lora") == "zoom-in:0.55"
    assert value("--lora") == f"{library.get('0:loras/outline.safetensors', 'lora').path}:0.3"
    assert [value(f) for f in ("--frames", "--width", "--steps", "--seed")] == ["8", "64", "3", "3"]
    two = Settings(
        prompt="x",
        seed=1,
        personal=library.get("builtin:outline-lora", "personal"),  # a LoRA style...
        loras=((library.get("0:loras/outline.safetensors", "lora"), 1.0),),  # ...and a LoRA
    )
    with pytest.raises(NotExpressible, match="one image LoRA"):
        config_entry(two)


def round_trip(service: Service, values: dict, tmp_path: Path):
    """Generate through the service, then run its command and its config through the CLI:
    the three GIFs' frames must be identical."""
    job, _ = service.submit(values)
    assert job.finished.wait(300) and job.state == DONE, job.message
    result = job.result
    argv = shlex.split(result.command)
    assert argv[:2] == ["animatediff", "generate"]
    assert main([*argv[1:], "-o", str(tmp_path / "command.gif")]) == 0
    head = result.config.read_text().splitlines()[0]  # "# animatediff generate --config ..."
    flags = shlex.split(head.removeprefix("# "))[4:]
    assert (
        main(["generate", "--config", str(result.config), *flags, "-o", str(tmp_path / "cfg")]) == 0
    )
    expected = read_video(result.gif)
    assert expected.shape == (3, values["frames"], values["height"], values["width"])
    assert torch.equal(read_video(tmp_path / "command.gif"), expected)
    # The config run writes its entry's GIF and, like the official script, a grid (sample.gif).
    (from_config,) = (tmp_path / "cfg").glob("000-*.gif")
    assert (tmp_path / "cfg" / "sample.gif").is_file()
    assert torch.equal(read_video(from_config), expected)
    return result


@pytest.mark.slow
def test_command_and_config_regenerate_the_same_frames(model_dir, tmp_path):
    service = Service([model_dir], tmp_path / "outputs")
    values = form(
        negative_prompt="worst quality",
        personal="builtin:stripes",
        lora_1="0:loras/outline.safetensors",
        lora_1_strength=0.6,
        motion_lora_1="0:motion/camera.ckpt",
        motion_lora_1_strength=0.8,
        adapter="builtin:adapter",
        adapter_scale=0.5,
        scheduler="euler_a",
        guidance_scale=6.5,
        fps=12,
        travel=[[0, "a red circle"], [-1, "a blue square"]],
        prompt_tail="best quality",
        motion_scale=0.9,
    )
    round_trip(service, values, tmp_path / "a")
    # a few-step preset (its scheduler settings: Euler with trailing timesteps)
    lightning = form(preset="lightning", scheduler="euler", steps=4, guidance_scale=1.0)
    round_trip(service, lightning, tmp_path / "lightning")
    if builtin.manifest().get("motion_modules"):  # the built-in 4-step student, by its name
        name = next(iter(builtin.manifest()["motion_modules"]))
        student = form(motion_module=f"builtin:{name}", preset="auto", scheduler="lcm", steps=4,
                       guidance_scale=2.0)  # fmt: skip
        result = round_trip(service, student, tmp_path / "student")
        assert f"--motion-module {name}" in result.command, result.command
    # a custom base, SparseCtrl keyframes, a ControlNet on a control video, an init image
    control = save_video(torch.rand(3, 8, 32, 32), tmp_path / "pose.gif")
    values = form(
        base="0:tiny-base",
        motion_module="0:mm_v3.ckpt",
        steps=2,
        sparsectrl="0:sparsectrl_rgb.ckpt",
        control_images=[png(tmp_path / "k0.png"), png(tmp_path / "k1.png", (20, 20, 200))],
        control_frames="0, 7",
        control_scale=0.8,
        controlnet_1="0:controlnet",
        controlnet_1_images=str(control),
        controlnet_1_scale=0.7,
        controlnet_1_start=0.0,
        controlnet_1_end=0.5,
        init_image=png(tmp_path / "init.png", (30, 200, 30)),
        strength=0.9,
    )
    result = round_trip(service, values, tmp_path / "b")
    assert service.manager.loads["base"] == 3  # built-in + stripes, built-in, the tiny base
    form_again = result.settings["form"]  # what "use these settings" puts back in the page
    assert Path(form_again["init_image"]).parent == result.folder
    assert [Path(p).parent for p in form_again["control_images"]] == [result.folder] * 2
    assert form_again["seed"] == 3 and form_again["sparsectrl"] == "0:sparsectrl_rgb.ckpt"


# -- the model manager ---------------------------------------------------------------------------
def spec(**changes):
    from animatediff.ui.settings import ModelSpec

    fields = dict(base=None, personal=None, vae=None, loras=(), adapter=None, motion_module=None)
    fields.update(motion_loras=(), sparsectrl=None, controlnets=())
    return ModelSpec(**{**fields, **changes})


def generate(pipe) -> torch.Tensor:
    return pipe(PROMPT, num_frames=8, num_inference_steps=2, seed=1, progress=False).frames


def weights(pipe) -> dict[str, torch.Tensor]:
    unet = {f"unet.{k}": v.clone() for k, v in pipe.unet.unet.state_dict().items()}
    return {**unet, **{f"text.{k}": v.clone() for k, v in pipe.text_encoder.state_dict().items()}}


@pytest.mark.slow
def test_model_manager_switches_without_reloading_the_base():
    lora = str(builtin.personal("outline-lora")[1])
    adapter, zoom, pan = (
        builtin.adapter(),
        builtin.motion_lora("zoom-in"),
        builtin.motion_lora("pan-left"),
    )
    other_module = str(builtin.baseline()[1])
    manager = ModelManager()
    unet2d = manager.pipeline(spec()).unet.unet
    original = weights(manager.pipe)
    cases = [
        (
            dict(loras=((lora, 0.7),), adapter=(str(adapter), 1.0)),
            dict(loras=[(lora, 0.7)], adapter=(adapter, 1.0)),
        ),
        (dict(adapter=(str(adapter), 0.5)), dict(adapter=(adapter, 0.5))),
        (
            dict(motion_module=other_module, motion_loras=((str(zoom), 0.8), (str(pan), 0.5))),
            dict(motion_module=other_module, motion_loras=[(zoom, 0.8), (pan, 0.5)]),
        ),
        (dict(motion_loras=((str(zoom), 0.3),)), dict(motion_loras=[(zoom, 0.3)])),
    ]
    for changes, load_kwargs in cases:
        pipe = manager.pipeline(spec(**changes))
        fresh = AnimationPipeline.load(**load_kwargs)
        assert torch.equal(generate(pipe), generate(fresh)), changes
        assert weights(pipe).keys() == weights(fresh).keys()
        assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(pipe).items())
    pipe = manager.pipeline(spec())
    assert pipe.unet.unet is unet2d and manager.loads["base"] == 1
    assert all(torch.equal(v, original[k]) for k, v in weights(pipe).items())
    assert manager.loads["motion_module"] == 2 and manager.loads["merge"] == 3


def test_model_manager_leaves_the_weights_clean_after_a_bad_lora():
    lora = str(builtin.personal("outline-lora")[1])
    not_an_image_lora = str(builtin.motion_lora("zoom-in"))
    manager = ModelManager()
    original = weights(manager.pipeline(spec()))
    manager.pipeline(spec(loras=((lora, 1.0),)))
    with pytest.raises(CheckpointError, match="targets layers this model lacks"):
        manager.pipeline(spec(loras=((lora, 0.5), (not_an_image_lora, 1.0))))
    assert all(torch.equal(v, original[k]) for k, v in weights(manager.pipe).items())
    pipe = manager.pipeline(spec(loras=((lora, 0.5),)))
    fresh = AnimationPipeline.load(loras=[(lora, 0.5)])
    assert all(torch.equal(v, weights(fresh)[k]) for k, v in weights(pipe).items())


# -- the queue -----------------------------------------------------------------------------------
def test_worker_runs_one_job_at_a_time_in_order_and_cancels():
    worker, order, gate, started = Worker(), [], threading.Event(), threading.Event()

    def first(job):
        started.set()
        gate.wait(10)
        order.append("first")

    one = worker.submit(first)
    two = worker.submit(lambda job: order.append("second") or "two")
    three = worker.submit(lambda job: order.append("third"))
    assert started.wait(10)
    assert (worker.ahead(two), worker.ahead(three)) == (1, 2)
    worker.cancel(three)
    assert three.state == CANCELLED and "before it started" in three.message
    gate.set()
    assert two.finished.wait(10) and one.state == two.state == DONE
    assert order == ["first", "second"] and two.result == "two"

    def steps(job):
        for i in range(1, 1000):
            job.progress(i, 1000)
            time.sleep(0.005)

    running = worker.submit(steps)
    while running.step < 3:
        time.sleep(0.01)
    worker.cancel(running)
    assert running.finished.wait(10) and running.state == CANCELLED
    assert running.message.startswith("cancelled at step") and running.eta() is not None

    def broken(job):
        raise RuntimeError("out of memory\n  while decoding")

    passes = worker.submit(lambda job: [job.progress(i, 3) for _ in range(2) for i in (1, 2, 3)])
    passes.passes = 2
    assert passes.finished.wait(10) and passes.pass_index == 1 and passes.eta() == 0

    failed = worker.submit(broken)
    assert failed.finished.wait(10)
    assert failed.state == FAILED and failed.message == "out of memory while decoding"


def test_results_are_found_only_by_their_generated_names(tmp_path):
    results = Results(tmp_path / "out")
    folder = results.new_folder()
    assert results.get(folder.name) is None  # not finished: no settings yet
    for name in ("../out", "..", str(folder), f"{folder.name}/../..", "20260101-000000-zzzzzz"):
        assert results.get(name) is None
    results.discard(folder)
    assert not folder.exists() and results.list() == []


def test_ui_command_without_gradio_says_how_to_install_it():
    code = (
        "import sys; sys.modules['gradio'] = None\n"
        "from animatediff.cli.main import main\n"
        "sys.exit(main(['ui']))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert 'pip install "animatediff[ui]"' in done.stderr and "Traceback" not in done.stderr


def test_builtin_few_step_students_are_offered(library):
    """The shipped few-step students sit among the motion modules, by their built-in names."""
    students = builtin.manifest().get("motion_modules", {})
    if not students:
        pytest.skip("no built-in few-step module in this tree")
    offered = keys(library, "motion_module")
    assert {f"builtin:{name}" for name in students} <= offered, offered


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--device", "bogus"], "--device"),
        (["--max-upload-mb", "nan"], "--max-upload-mb"),
        (["--port", "0"], "--port"),
        (["--auth", "nopassword"], "--auth"),
    ],
)
def test_ui_arguments_are_checked_before_starting(args, needle, capsys):
    assert main(["ui", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0], err
