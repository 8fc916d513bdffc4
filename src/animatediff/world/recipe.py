"""The built-in models' recipe: what data the build renders and every training run it makes, as
`animatediff train` configs. `build` runs it, `pack` ships its results, `evaluate` names them;
all three read it here (and none imports another).

The recipe's choices, each measured (README.md's built-in model section, docs/builtin/pan-left.md):
- the text encoder is trained with the base (`train.train_text_encoder`): a frozen random one
  is a bag of words, and no UNet can learn from it which colour is the background; half the
  stills carry a motion caption (true of a clip's first frame), else the motion and camera
  words, unseen, would scramble the encoding of the words after them;
- the base trains long enough to learn shapes (they are decided at high noise);
- the motion module and everything trained on it use a mixed noise prior (`noise.shared_noise`,
  PYoCo): a share of each frame's noise is common to the clip, so frames agree on layout and
  background at high noise, and the module learns to draw on the other frames there.
"""

from __future__ import annotations

from pathlib import Path

from .styles import STYLES

SEED = 0
SIZE = 64  # pixels; the VAE downsamples by 4 to 16x16 latents
EXTRA_WORDS = ("best", "quality", "worst", "low", "bad")  # common negative-prompt words
# Item i of a dataset is drawn from the seed (seed, i): a larger count only adds items.
DATA = {"images": 12000, "videos": 1200, "style_images": 48, "motion_lora_clips": 30}
# The share of the base's stills captioned as the first frame of a clip ("a red circle moving
# left slowly on ...", "zooming in on ..."): the text encoder learns every word with the base.
MOTION_CAPTIONS = 0.5
DATA_VERSION = 2  # raised when what a data folder holds changes (its folder is rendered again)
STYLE_LORA = "outline"  # this personal style also ships as a kohya LoRA
MOTION_LORAS = ("zoom-in", "pan-left")
# The fraction of each frame's noise variance common to all frames of a clip, for the motion
# module and every stage trained on it (and so for sampling: the module stores it).
SHARED_NOISE = 0.5
BASE_TRAIN = {
    "steps": 10000,
    "batch_size": 64,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 200,
    "train_text_encoder": True,
}
MOTION_TRAIN = {
    "steps": 3000,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "lr_scheduler": "cosine",
    "warmup_steps": 100,
}
LORA_TRAIN = {
    "zoom-in": {"steps": 200},
    "pan-left": {"steps": 600},
}
# MotionLoRAs trained like one above but with a lower rank or fewer clips (the first N).
LORA_STUDIES = {
    "zoom-in-rank2": {"kind": "zoom-in", "rank": 2},
    "zoom-in-clips10": {"kind": "zoom-in", "clips": 10},
}
MOTION_RUN = "motion"  # the run whose motion module ships
ABLATION_STEPS = 600  # the image-layer ablation continues the shipped module this long


def study_clips_folder(root: Path, study: dict) -> Path:
    """Where a MotionLoRA study trained on fewer clips finds them (the first N of its kind)."""
    return root / f"motion-{study['kind']}-{study['clips']}"


IMAGE = {"num_frames": 1, "sample_stride": 1}  # the data of the image stages
CLIP = {"num_frames": 16, "sample_stride": 1}  # and of the video stages


def stage_configs(work: Path) -> dict[str, dict]:
    """Every training run of the build after the VAE, as `animatediff train` configs, in the
    order they run: the shipped models first, the ablation and studies last."""
    configs = {**_model_configs(work), **_motion_lora_configs(work), **_style_configs(work)}
    configs["motion-image-layers"] = _ablation_config(work, configs[MOTION_RUN])
    configs.update(_study_configs(work, configs))
    return configs


def _run(work: Path, name: str) -> str:
    return str(work / "runs" / name)


def _adapter_file(work: Path) -> str:
    return str(work / "runs" / "adapter" / "domain_adapter.safetensors")


def _module_file(work: Path) -> str:
    return str(work / "runs" / MOTION_RUN / "motion_module.safetensors")


def _model_configs(work: Path) -> dict[str, dict]:
    """The base (UNet and text encoder), the domain adapter and the motion module."""
    data, base = work / "data", str(work / "base")
    return {
        "base": dict(
            stage="image_finetune",
            base=str(work / "base-init"),
            output_dir=_run(work, "base"),
            data={"videos": str(data / "images"), **IMAGE, "caption_dropout": 0.1},
            train=BASE_TRAIN,
        ),
        "adapter": dict(
            stage="adapter",
            base=base,
            output_dir=_run(work, "adapter"),
            data={"videos": str(data / "videos"), **IMAGE},
            train={"steps": 400, "batch_size": 32, "learning_rate": 1e-3, "rank": 8},
        ),
        MOTION_RUN: dict(
            stage="motion",
            base=base,
            adapter=_adapter_file(work),
            output_dir=_run(work, MOTION_RUN),
            data={"videos": str(data / "videos"), **CLIP, "caption_dropout": 0.1},
            train={**MOTION_TRAIN, "noise": {"shared_noise": SHARED_NOISE}},
        ),
    }


def _motion_lora_configs(work: Path) -> dict[str, dict]:
    """A MotionLoRA per camera motion, on the shipped module (its noise prior is their default)."""
    return {
        f"motion-lora-{kind}": dict(
            stage="motion_lora",
            base=str(work / "base"),
            motion_module=_module_file(work),
            adapter=_adapter_file(work),
            adapter_scale=0.0,
            output_dir=_run(work, f"motion-lora-{kind}"),
            data={"videos": str(work / "data" / f"motion-{kind}"), **CLIP},
            train={"batch_size": 4, "learning_rate": 1e-3, "rank": 8, **LORA_TRAIN[kind]},
        )
        for kind in MOTION_LORAS
    }


def _style_configs(work: Path) -> dict[str, dict]:
    """A personal model per style (the base fine-tuned on its stills) and one style's LoRA."""
    data, base = work / "data", str(work / "base")
    configs = {
        f"personal-{style}": dict(
            stage="image_finetune",
            base=base,
            output_dir=_run(work, f"personal-{style}"),
            data={"videos": str(data / f"style-{style}"), **IMAGE},
            train={"steps": 250, "batch_size": 16, "learning_rate": 3e-4},
        )
        for style in STYLES
    }
    configs[f"lora-{STYLE_LORA}"] = dict(
        stage="adapter",  # a LoRA on the spatial attention, trained on the style's stills
        base=base,
        output_dir=_run(work, f"lora-{STYLE_LORA}"),
        data={"videos": str(data / f"style-{STYLE_LORA}"), **IMAGE},
        train={"steps": 300, "batch_size": 16, "learning_rate": 1e-3, "rank": 8},
    )
    return configs


def _ablation_config(work: Path, motion: dict) -> dict:
    """The design the paper argues against: the shipped module (trained by `motion`) continued
    with the image layers trained as well, without the adapter."""
    return {
        **{k: v for k, v in motion.items() if k != "adapter"},
        "motion_module": _module_file(work),
        "output_dir": _run(work, "motion-image-layers"),
        "train": {
            **motion["train"],
            "steps": ABLATION_STEPS,
            "learning_rate": 5e-4,
            "warmup_steps": 30,
            "train_image_layers": True,
        },
    }


def _study_configs(work: Path, configs: dict[str, dict]) -> dict[str, dict]:
    """How a MotionLoRA depends on its rank and number of clips (shipped for `evaluate`): each
    study is its kind's run with a lower rank or the first N clips."""
    studies = {}
    for name, study in LORA_STUDIES.items():
        like = configs[f"motion-lora-{study['kind']}"]
        videos = like["data"]["videos"]
        if "clips" in study:
            videos = study_clips_folder(work / "data", study)
        studies[f"motion-lora-{name}"] = {
            **like,
            "output_dir": _run(work, f"motion-lora-{name}"),
            "data": {**like["data"], "videos": str(videos)},
            "train": {**like["train"], "rank": study.get("rank", like["train"]["rank"])},
        }
    return studies


# What each run leaves when it is done (its `output_dir`'s file or folder).
RESULTS = {
    "base": "unet",
    "adapter": "domain_adapter.safetensors",
    MOTION_RUN: "motion_module.safetensors",
    **{f"motion-lora-{k}": "motion_lora.safetensors" for k in MOTION_LORAS},
    **{f"personal-{s}": "unet" for s in STYLES},
    f"lora-{STYLE_LORA}": "domain_adapter.safetensors",
    "motion-image-layers": "motion_module.safetensors",
    **{f"motion-lora-{name}": "motion_lora.safetensors" for name in LORA_STUDIES},
}
