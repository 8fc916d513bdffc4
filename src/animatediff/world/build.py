"""Build the built-in models from nothing: the world's data, then every AnimateDiff stage
trained with this project's trainer (`recipe.stage_configs`), then the shipped files.

    python -m animatediff.world.build WORKDIR [--pack] [--only STAGE ...] [--cache DIR]

Seeded and resumable: each step writes into WORKDIR and is skipped when its result exists, and
an interrupted training run continues from its latest checkpoint (the trainer's `--resume`),
with the data and noise the uninterrupted run would have seen. `--cache DIR` carries a build
across machines or sittings: results and in-progress checkpoints are copied from DIR into
WORKDIR first, and back into DIR after each step (the rendered data and latents are not: they
are remade from the seed). `--pack` copies the results (fp16) into the package.
"""

from __future__ import annotations

import argparse
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTokenizer

from ..builtin import write_word_tokenizer
from ..builtin.model import random_text_encoder
from ..checkpoints.base import save_pipeline_files
from ..training import parse_config, train
from ..training.encode import encode_dataset
from ..video import read_video
from .datasets import write_images, write_videos
from .pack import add_student, pack
from .recipe import (
    DATA,
    DATA_VERSION,
    EXTRA_WORDS,
    LORA_STUDIES,
    MOTION_CAPTIONS,
    MOTION_LORAS,
    RESULTS,
    SEED,
    SIZE,
    stage_configs,
    study_clips_folder,
)
from .scene import VOCABULARY
from .styles import STYLES


def _step(name: str, done: Path, fn: Callable[[], None]) -> None:
    if done.exists():
        print(f"[build] {name}: done before, skipped")
        return
    start = time.perf_counter()
    print(f"[build] {name} ...", flush=True)
    fn()
    print(f"[build] {name}: {time.perf_counter() - start:.0f} s", flush=True)


# -- data ------------------------------------------------------------------------------------------
Writer = Callable[[Path, int], object]


def datasets() -> dict[str, tuple[int, Writer]]:
    """Every data folder of the recipe: how many items, and what writes them."""
    sets: dict[str, tuple[int, Writer]] = {
        "images": (
            DATA["images"],
            lambda f, n: write_images(f, n, SEED, motion_captions=MOTION_CAPTIONS),
        ),
        "videos": (DATA["videos"], lambda f, n: write_videos(f, n, SEED + 1, web=True)),
    }
    for style in STYLES:
        write = lambda f, n, s=style: write_images(f, n, SEED + 2, s)  # noqa: E731
        sets[f"style-{style}"] = (DATA["style_images"], write)
    for i, kind in enumerate(MOTION_LORAS):
        write = lambda f, n, s=SEED + 3 + i, k=kind: write_videos(f, n, s, (k,), web=False)  # noqa: E731
        sets[f"motion-{kind}"] = (DATA["motion_lora_clips"], write)
    for study in LORA_STUDIES.values():  # the first N clips (item i depends on the seed and i)
        if "clips" in study:
            name = study_clips_folder(Path(), study).name
            sets[name] = (study["clips"], sets[f"motion-{study['kind']}"][1])
    return sets


def make_data(root: Path) -> None:
    """Every data folder, each marked done with its count when written: a larger count in the
    recipe renders that folder again, to the same first items."""
    for name, (n, write) in datasets().items():
        done = root / name / f"DONE-v{DATA_VERSION}-{n}"
        if not done.exists():
            shutil.rmtree(root / name, ignore_errors=True)
            write(root / name, n)
            done.write_text("")
    (root / f"DONE-{_data_key()}").write_text("")


# -- base model: tokenizer, text encoder, VAE, UNet ------------------------------------------------
def make_base_skeleton(folder: Path) -> None:
    """Tokenizer for the world's words, a random CLIP text encoder and a random UNet to train
    together, and the scheduler. The encoder's token and position embeddings start equally
    wide: CLIP's init (positions 50x narrower than these words) leaves it a bag of words that
    cannot tell the object's colour from the background's, and training has to undo that."""
    torch.manual_seed(SEED)
    write_word_tokenizer(folder / "tokenizer", tuple(VOCABULARY) + EXTRA_WORDS)
    tokenizer = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    text = random_text_encoder(tokenizer)
    torch.nn.init.normal_(text.get_input_embeddings().weight, std=1.0)
    positions = next(m for n, m in text.named_modules() if n.endswith("position_embedding"))
    torch.nn.init.normal_(positions.weight, std=1.0)
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
    save_pipeline_files(folder)  # the VAE follows (`train_vae`)


def train_vae(data: Path, folder: Path, steps: int = 1600, batch: int = 16) -> None:
    """A small KL autoencoder (x4 downsampling) on stills and video frames; its latents are
    scaled to unit variance as SD's 0.18215 does for SD's VAE."""
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
    (`animatediff train --encode`): the VAE would otherwise cost more than the UNet. A run
    with a checkpoint continues from it."""
    config = {"report_to": [], "checkpoint": {"every": 250, "keep": 1}, **config}
    config["data"] = {"sample_size": SIZE, "num_workers": 0, **config["data"]}
    config["train"] = {"seed": SEED, "log_every": 25, **config["train"]}
    frames = config["data"]["num_frames"]
    videos = Path(config["data"]["videos"])
    count = len(list(videos.glob("*.txt")))
    cache = work / "latents" / f"{videos.name}-{frames}f-{count}-v{DATA_VERSION}"
    if not (cache / "DONE").exists():
        shutil.rmtree(cache, ignore_errors=True)
        encode_dataset(parse_config(config), cache)
        (cache / "DONE").write_text("")
    config["data"] = {**config["data"], "cache": str(cache)}
    del config["data"]["videos"]
    resume = any((Path(config["output_dir"]) / "checkpoints").glob("step-*"))
    return train(config, resume=resume)


def _data_key() -> str:
    return f"v{DATA_VERSION}-" + "-".join(str(n) for n, _ in datasets().values())


def _assemble_base(work: Path) -> None:
    """The trained base: base-init's tokenizer, VAE and scheduler with the trained UNet and
    text encoder, written beside and renamed into place."""
    tmp, run = work / "base.tmp", work / "runs" / "base"
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(work / "base-init", tmp)
    for part in ("unet", "text_encoder"):
        if (run / part).exists():
            shutil.rmtree(tmp / part)
            shutil.copytree(run / part, tmp / part)
    tmp.rename(work / "base")


def build(work: Path, only: tuple[str, ...] = (), cache: Path | None = None) -> None:
    """Run every step not done yet (with `only`, just those training runs, after the data,
    VAE and base they need)."""
    work.mkdir(parents=True, exist_ok=True)
    if cache is not None:
        restore_cache(cache, work)
    _step("data", work / "data" / f"DONE-{_data_key()}", lambda: make_data(work / "data"))

    def init() -> None:
        make_base_skeleton(work / "base-init")
        train_vae(work / "data", work / "base-init")

    _step("base skeleton + VAE", work / "base-init" / "vae" / "config.json", init)
    configs = stage_configs(work)
    for name, result in RESULTS.items():
        if only and name not in only and name != "base":
            continue
        done = Path(configs[name]["output_dir"]) / result
        try:
            _step(name, done, lambda c=configs[name]: _train(c, work))
        finally:
            if cache is not None:
                save_cache(work, cache)
        if name == "base" and not (work / "base").exists():
            _assemble_base(work)


# -- carrying a build between sittings ---------------------------------------------------------
CACHE_SKIP = ("data", "latents", "validation", "motion_module_diffusers", "loss.png")


def _cache_files(root: Path) -> list[Path]:
    """Files of a work folder worth carrying: all but what is remade from the seed."""
    files = []
    for f in sorted(root.rglob("*")):
        parts = f.relative_to(root).parts
        if f.is_file() and not any(p in CACHE_SKIP or p.startswith(".tmp") for p in parts):
            files.append(f)
    return files


def save_cache(work: Path, cache: Path) -> None:
    """Mirror the work folder's results and latest checkpoints into `cache`."""
    keep = {f.relative_to(work) for f in _cache_files(work)}
    for f in _cache_files(cache):
        if f.relative_to(cache) not in keep:
            f.unlink()
    for folder in sorted(cache.rglob("*"), reverse=True):  # deepest first: stale checkpoints
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    for rel in sorted(keep):
        src, dst = work / rel, cache / rel
        if not dst.exists() or dst.stat().st_size != src.stat().st_size or _newer(src, dst):
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst)


def _newer(a: Path, b: Path) -> bool:
    return a.stat().st_mtime > b.stat().st_mtime + 1


def restore_cache(cache: Path, work: Path) -> None:
    """Copy what `save_cache` kept into the work folder (files the work folder lacks)."""
    for f in _cache_files(cache):
        dst = work / f.relative_to(cache)
        if not dst.exists():
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, dst)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("workdir", type=Path)
    p.add_argument("--only", nargs="*", default=(), help="train only these runs")
    p.add_argument("--cache", type=Path, help="carry results and checkpoints through this folder")
    p.add_argument("--sync-cache", action="store_true", help="only mirror WORKDIR into --cache")
    p.add_argument("--pack", action="store_true", help="copy the results into the package")
    p.add_argument(
        "--student",
        type=_student,
        action="append",
        default=[],
        metavar="NAME=RUN",
        help="then ship the few-step student a `distill` run made in folder RUN as NAME",
    )
    args = p.parse_args(argv)
    if args.sync_cache:
        if args.cache is None:
            p.error("--sync-cache needs --cache DIR")
        save_cache(args.workdir, args.cache)
        return
    build(args.workdir, tuple(args.only), args.cache)
    if args.pack:
        pack(args.workdir)
    for name, run in args.student:
        print(f"shipped {name}: {add_student(name, run)}")


def _student(text: str) -> tuple[str, Path]:
    """NAME=RUN, checked before the build runs: RUN holds a distill run's motion module."""
    name, _, run = text.partition("=")
    if not name or not run:
        raise argparse.ArgumentTypeError(f"expected NAME=RUN, got {text!r}")
    if not (Path(run) / "motion_module.safetensors").is_file():
        raise argparse.ArgumentTypeError(f"{run}: no motion_module.safetensors (a distill run?)")
    return name, Path(run)


if __name__ == "__main__":
    main()
