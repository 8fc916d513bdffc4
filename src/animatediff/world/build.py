"""Build the built-in models from nothing: the world's data, then every AnimateDiff stage
trained with this project's trainer, then the shipped files.

    python -m animatediff.world.build WORKDIR [--pack]    # seeded; resumes where it stopped

Each step writes into WORKDIR and is skipped when its result exists, so an interrupted build
continues. `--pack` copies the results (fp16) into the package (`animatediff/builtin/data`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch

from .datasets import write_images, write_videos
from .scene import VOCABULARY
from .styles import STYLES

SEED = 0
SIZE = 64  # pixels; the VAE downsamples by 4 to 16x16 latents
EXTRA_WORDS = ("best", "quality", "worst", "low", "bad")  # common negative-prompt words
DATA = {"images": 3000, "videos": 600, "style_images": 48, "motion_lora_clips": 30}
STYLE_LORA = "outline"  # this personal style also ships as a kohya LoRA
MOTION_LORAS = ("zoom-in", "pan-left")
# A shift across the frame is the harder motion: pan-left trains longer, and only at the noise
# levels where the layout is decided (timesteps 100-999), not at the lowest, where a MotionLoRA
# otherwise spends itself on the clips' fine detail.
LORA_TRAIN = {
    "zoom-in": {"steps": 200},
    "pan-left": {
        "steps": 1000,
        "learning_rate": 1.5e-3,
        "lr_scheduler": "cosine",
        "warmup_steps": 50,
        "noise": {"timesteps": [100, 1000]},
    },
}
# MotionLoRAs trained like one above but with a lower rank or fewer clips (the first N).
LORA_STUDIES = {
    "zoom-in-rank2": {"kind": "zoom-in", "rank": 2},
    "zoom-in-clips10": {"kind": "zoom-in", "clips": 10},
}
MOTION_RUN = "motion-2"  # the run whose motion module ships


def _step(name: str, done: Path, fn: Callable[[], None]) -> None:
    if done.exists():
        print(f"[build] {name}: done before, skipped")
        return
    start = time.perf_counter()
    print(f"[build] {name} ...", flush=True)
    fn()
    print(f"[build] {name}: {time.perf_counter() - start:.0f} s", flush=True)


# -- data ------------------------------------------------------------------------------------------
def study_clips_folder(root: Path, study: dict) -> Path:
    """Where a MotionLoRA study trained on fewer clips finds them (the first N of its kind)."""
    return root / f"motion-{study['kind']}-{study['clips']}"


def make_data(root: Path) -> None:
    write_images(root / "images", DATA["images"], SEED)
    write_videos(root / "videos", DATA["videos"], SEED + 1, web=True)
    for style in STYLES:
        write_images(root / f"style-{style}", DATA["style_images"], SEED + 2, style=style)
    for i, kind in enumerate(MOTION_LORAS):
        write_videos(
            root / f"motion-{kind}", DATA["motion_lora_clips"], SEED + 3 + i, (kind,), web=False
        )
    for study in LORA_STUDIES.values():  # the first N clips (item i depends on the seed and i)
        if "clips" in study:
            kind = study["kind"]
            seed = SEED + 3 + MOTION_LORAS.index(kind)
            write_videos(study_clips_folder(root, study), study["clips"], seed, (kind,), web=False)
    (root / "DONE").write_text("")


# -- base model: tokenizer, text encoder, VAE, UNet ------------------------------------------------
def make_base_skeleton(folder: Path) -> None:
    """Tokenizer for the world's words, a frozen random CLIP text encoder (its token embeddings
    spread wide so each word is distinct), a random UNet to train, and the scheduler."""
    from diffusers import DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTokenizer

    from ..builtin import write_word_tokenizer
    from ..builtin.model import tiny_text_encoder
    from ..schedule import ANIMATEDIFF_SCHEDULE

    torch.manual_seed(SEED)
    write_word_tokenizer(folder / "tokenizer", tuple(VOCABULARY) + EXTRA_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = tiny_text_encoder(tokenizer)
    torch.nn.init.normal_(text.get_input_embeddings().weight, std=1.0)
    text.save_pretrained(folder / "text_encoder")
    UNet2DConditionModel(
        sample_size=SIZE // 4,
        block_out_channels=(32, 64, 64),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=8,
    ).save_pretrained(folder / "unet")
    DDIMScheduler(**ANIMATEDIFF_SCHEDULE).save_pretrained(folder / "scheduler")
    (folder / "model_index.json").write_text(
        json.dumps(
            {
                "_class_name": "StableDiffusionPipeline",
                "_diffusers_version": "0.30.0",
                "text_encoder": ["transformers", "CLIPTextModel"],
                "tokenizer": ["transformers", "CLIPTokenizer"],
                "unet": ["diffusers", "UNet2DConditionModel"],
                "vae": ["diffusers", "AutoencoderKL"],
                "scheduler": ["diffusers", "DDIMScheduler"],
                "safety_checker": [None, None],
                "feature_extractor": [None, None],
            }
        )
    )


def train_vae(data: Path, folder: Path, steps: int = 1600, batch: int = 16) -> None:
    """A small KL autoencoder (x4 downsampling) on stills and video frames; its latents are
    scaled to unit variance as SD's 0.18215 does for SD's VAE."""
    from diffusers import AutoencoderKL

    from ..video import read_video

    torch.manual_seed(SEED)
    files = (
        sorted((data / "images").glob("*.png"))[:1500]
        + sorted((data / "videos").glob("*.mp4"))[:150]
    )
    pixels = torch.cat([read_video(f).transpose(0, 1) for f in files])  # (n, 3, h, w) frames
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # narrow at full resolution: that is where the cost is
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=16,
        sample_size=SIZE,
    )
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    g = torch.Generator().manual_seed(SEED)
    for step in range(steps):
        # Random 32x32 crops: 4x cheaper than whole frames, and the autoencoder is convolutional.
        top, left = torch.randint(0, SIZE - 31, (2,), generator=g).tolist()
        x = pixels[torch.randint(len(pixels), (batch,), generator=g)] * 2 - 1
        x = x[..., top : top + 32, left : left + 32]
        posterior = vae.encode(x).latent_dist
        recon = vae.decode(posterior.sample(g)).sample
        loss = torch.nn.functional.mse_loss(recon, x) + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 50 == 0:
            print(f"[vae] step {step} loss {loss.item():.4f}", flush=True)
    with torch.no_grad():
        sample = pixels[torch.randperm(len(pixels), generator=g)[:256]] * 2 - 1
        std = vae.encode(sample).latent_dist.mean.std().item()
    vae.register_to_config(scaling_factor=round(1.0 / std, 5))
    vae.save_pretrained(folder / "vae")


# -- the AnimateDiff stages, with `animatediff.training.train` --------------------------------------
def _train(config: dict, work: Path) -> list[Path]:
    """One `animatediff train` run, on latents pre-encoded once per dataset and clip length
    (`animatediff train --encode`): the VAE would otherwise cost more than the UNet."""
    from ..training import parse_config, train
    from ..training.encode import encode_dataset

    config = {"report_to": [], "checkpoint": {"every": 500, "keep": 1}, **config}
    config["data"] = {"sample_size": SIZE, "num_workers": 0, **config["data"]}
    config["train"] = {"seed": SEED, "log_every": 25, **config["train"]}
    frames = config["data"]["num_frames"]
    cache = work / "latents" / f"{Path(config['data']['videos']).name}-{frames}f"
    if not (cache / "DONE").exists():
        shutil.rmtree(cache, ignore_errors=True)
        encode_dataset(parse_config(config), cache)
        (cache / "DONE").write_text("")
    config["data"] = {**config["data"], "cache": str(cache)}
    del config["data"]["videos"]
    return train(config)


def stage_configs(work: Path) -> dict[str, dict]:
    """Every training run of the build, as `animatediff train` configs."""
    data, base = work / "data", work / "base"
    image = {"num_frames": 1, "sample_stride": 1}
    clip = {"num_frames": 16, "sample_stride": 1}
    configs = {
        "base": dict(
            stage="image_finetune",
            base=str(work / "base-init"),
            output_dir=str(work / "runs" / "base"),
            data={"videos": str(data / "images"), **image, "caption_dropout": 0.1},
            train={
                "steps": 1000,
                "batch_size": 64,
                "learning_rate": 1e-3,
                "lr_scheduler": "cosine",
                "warmup_steps": 100,
            },
        ),
        "adapter": dict(
            stage="adapter",
            base=str(base),
            output_dir=str(work / "runs" / "adapter"),
            data={"videos": str(data / "videos"), **image},
            train={"steps": 400, "batch_size": 32, "learning_rate": 1e-3, "rank": 8},
        ),
        "motion": dict(
            stage="motion",
            base=str(base),
            adapter=str(work / "runs" / "adapter" / "domain_adapter.safetensors"),
            output_dir=str(work / "runs" / "motion"),
            data={"videos": str(data / "videos"), **clip, "caption_dropout": 0.1},
            train={
                "steps": 500,
                "batch_size": 4,
                "learning_rate": 1e-3,
                "lr_scheduler": "cosine",
                "warmup_steps": 50,
            },
        ),
    }
    motion = configs["motion"]
    # A second phase continues the module at a lower rate: the shipped module. The ablation
    # continues the same phase-1 module for as long with the image layers trained as well.
    configs[MOTION_RUN] = {
        **motion,
        "motion_module": str(work / "runs" / "motion" / "motion_module.safetensors"),
        "output_dir": str(work / "runs" / MOTION_RUN),
        "train": {**motion["train"], "steps": 600, "learning_rate": 5e-4, "warmup_steps": 30},
    }
    phase2 = configs[MOTION_RUN]
    configs["motion-image-layers"] = {  # the design the paper argues against (an ablation)
        **{k: v for k, v in phase2.items() if k != "adapter"},
        "output_dir": str(work / "runs" / "motion-image-layers"),
        "train": {**phase2["train"], "train_image_layers": True},
    }
    for kind in MOTION_LORAS:
        configs[f"motion-lora-{kind}"] = dict(
            stage="motion_lora",
            base=str(base),
            motion_module=str(work / "runs" / MOTION_RUN / "motion_module.safetensors"),
            adapter=str(work / "runs" / "adapter" / "domain_adapter.safetensors"),
            adapter_scale=0.0,
            output_dir=str(work / "runs" / f"motion-lora-{kind}"),
            data={"videos": str(data / f"motion-{kind}"), **clip},
            train={"batch_size": 4, "learning_rate": 1e-3, "rank": 8, **LORA_TRAIN[kind]},
        )
    # How a MotionLoRA depends on its rank and number of clips (shipped for `evaluate`).
    for name, study in LORA_STUDIES.items():
        kind = study["kind"]
        like = configs[f"motion-lora-{kind}"]
        videos = study_clips_folder(data, study) if "clips" in study else like["data"]["videos"]
        configs[f"motion-lora-{name}"] = {
            **like,
            "output_dir": str(work / "runs" / f"motion-lora-{name}"),
            "data": {**like["data"], "videos": str(videos)},
            "train": {**like["train"], "rank": study.get("rank", like["train"]["rank"])},
        }
    for style in STYLES:
        configs[f"personal-{style}"] = dict(
            stage="image_finetune",
            base=str(base),
            output_dir=str(work / "runs" / f"personal-{style}"),
            data={"videos": str(data / f"style-{style}"), **image},
            train={"steps": 250, "batch_size": 16, "learning_rate": 3e-4},
        )
    configs[f"lora-{STYLE_LORA}"] = dict(
        stage="adapter",  # a LoRA on the spatial attention, trained on the style's stills
        base=str(base),
        output_dir=str(work / "runs" / f"lora-{STYLE_LORA}"),
        data={"videos": str(data / f"style-{STYLE_LORA}"), **image},
        train={"steps": 300, "batch_size": 16, "learning_rate": 1e-3, "rank": 8},
    )
    return configs


def build(work: Path, only: tuple[str, ...] = ()) -> None:
    work.mkdir(parents=True, exist_ok=True)
    _step("data", work / "data" / "DONE", lambda: make_data(work / "data"))

    def init() -> None:
        make_base_skeleton(work / "base-init")
        train_vae(work / "data", work / "base-init")

    _step("base skeleton + VAE", work / "base-init" / "vae" / "config.json", init)

    def base() -> None:
        _train(stage_configs(work)["base"], work)
        shutil.copytree(work / "base-init", work / "base.tmp", dirs_exist_ok=True)
        shutil.rmtree(work / "base.tmp" / "unet")
        shutil.copytree(work / "runs" / "base" / "unet", work / "base.tmp" / "unet")
        (work / "base.tmp").rename(work / "base")

    _step("base UNet", work / "base" / "unet", base)
    configs = stage_configs(work)
    results = {  # in order of importance: the shipped models first, the ablations last
        "adapter": "domain_adapter.safetensors",
        "motion": "motion_module.safetensors",
        MOTION_RUN: "motion_module.safetensors",
        **{f"motion-lora-{k}": "motion_lora.safetensors" for k in MOTION_LORAS},
        **{f"personal-{s}": "unet" for s in STYLES},
        f"lora-{STYLE_LORA}": "domain_adapter.safetensors",
        "motion-image-layers": "motion_module.safetensors",
        **{f"motion-lora-{name}": "motion_lora.safetensors" for name in LORA_STUDIES},
    }
    for name, result in results.items():
        if only and name not in only:
            continue
        done = Path(configs[name]["output_dir"]) / result
        _step(name, done, lambda c=configs[name]: _train(c, work))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--only", nargs="*", default=(), help="train only these stages")
    p.add_argument("--pack", action="store_true", help="copy the results into the package")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    build(args.workdir, tuple(args.only))
    if args.pack:
        from .pack import pack

        pack(args.workdir)


if __name__ == "__main__":
    main()
