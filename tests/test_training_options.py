"""Two training options the built-in model's recipe needs, on the tiny random model:

- `train.noise.shared_noise`: video stages draw each clip's noise from the mixed noise prior that
  sampling uses (`pipeline.noise.mix_shared_noise`, seeded per sample), and the motion module
  stores the prior it was trained with (a MotionLoRA trains with its module's by default);
- `train.train_text_encoder`: image fine-tuning trains the text encoder with the UNet and saves
  it beside the UNet, in the layout of a diffusers base folder that the pipeline loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from animatediff.builtin.model import random_model
from animatediff.training import ConfigError, parse_config, train
from animatediff.training.config import NoiseConfig
from animatediff.training.loss import diffusion_loss, make_noise_scheduler, sample_noise


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    from animatediff.world.datasets import write_videos

    folder = tmp_path_factory.mktemp("clips")
    write_videos(folder, 2, seed=0, kinds=("move",), num_frames=4)
    return folder


def config(stage: str, out: Path, clips: Path, **train_options) -> dict:
    return {
        "stage": stage,
        "base": str(random_model().base),
        "output_dir": str(out),
        "data": {
            "videos": str(clips),
            "num_frames": 4,
            "sample_size": 64,
            "sample_stride": 1,
            "num_workers": 0,
        },
        "train": {"steps": 2, "batch_size": 2, "learning_rate": 1e-3, **train_options},
        "checkpoint": {"every": 0},
        "report_to": [],
    }


def generators(seed: int, n: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(seed + i) for i in range(n)]


def test_shared_noise_is_the_sampling_prior_per_sample():
    """Each sample's noise is `mix_shared_noise` of its own draw with its own generator, as
    the pipeline draws it; 0 leaves the noise as before; images (4-d) are never mixed."""
    from animatediff.pipeline.noise import mix_shared_noise

    shape = (3, 4, 5, 6, 6)
    for shared in (0.3, 0.7):
        mixed = sample_noise(shape, generators(10, 3), 0.0, shared)
        for i, g in enumerate(generators(10, 3)):
            own = torch.randn(shape[1:], generator=g)
            expected = mix_shared_noise(own[None], shared, g)[0]
            torch.testing.assert_close(mixed[i], expected, rtol=0, atol=0)
    plain = torch.stack([torch.randn(shape[1:], generator=g) for g in generators(10, 3)])
    assert torch.equal(sample_noise(shape, generators(10, 3), 0.0, 0.0), plain)
    image = (3, 4, 6, 6)
    assert torch.equal(
        sample_noise(image, generators(1, 3), 0.0, 0.5), sample_noise(image, generators(1, 3), 0.0)
    )


@pytest.mark.parametrize("shared", [0.25, 0.6])
def test_shared_noise_correlates_frames_by_its_share_and_keeps_unit_variance(shared):
    noise = sample_noise((64, 4, 8, 8, 8), generators(0, 64), 0.0, shared)
    assert abs(noise.var().item() - 1) < 0.03
    a, b = noise[:, :, 0].flatten(), noise[:, :, 5].flatten()
    assert abs(torch.corrcoef(torch.stack([a, b]))[0, 1].item() - shared) < 0.03


def test_diffusion_loss_uses_the_configured_prior():
    """The loss's target is the mixed noise: a predictor that returns the (known) mixed noise
    scores zero, one that returns the unmixed noise does not."""
    latents = torch.zeros(2, 4, 3, 4, 4)
    noise_config = NoiseConfig(shared_noise=0.5)
    scheduler = make_noise_scheduler(noise_config)
    expected = sample_noise(tuple(latents.shape), generators(3, 2), 0.0, 0.5)
    unmixed = sample_noise(tuple(latents.shape), generators(3, 2), 0.0, 0.0)
    exact = diffusion_loss(
        lambda x, t: expected, latents, scheduler, noise_config, generators(3, 2)
    )
    wrong = diffusion_loss(lambda x, t: unmixed, latents, scheduler, noise_config, generators(3, 2))
    assert exact.item() == 0.0 and wrong.item() > 0.1


def test_bad_options_are_config_errors(tmp_path, clips):
    with pytest.raises(ConfigError, match="shared_noise"):
        parse_config(config("motion", tmp_path, clips) | {"train": {"noise": {"shared_noise": 1}}})
    with pytest.raises(ConfigError, match="train_text_encoder"):
        parse_config(config("motion", tmp_path, clips, train_text_encoder=True))


def test_motion_module_stores_its_prior_and_a_motion_lora_trains_with_it(tmp_path, clips):
    from animatediff.checkpoints.io import read_metadata
    from animatediff.checkpoints.motion import load_motion_module
    from animatediff.training.trainer import Trainer

    cfg = config("motion", tmp_path / "motion", clips, noise={"shared_noise": 0.4})
    module = tmp_path / "motion" / "motion_module.safetensors"
    train(cfg)
    assert load_motion_module(module).config.shared_noise == 0.4
    assert '"shared_noise": 0.4' in read_metadata(module)["animatediff.training_config"]
    lora = parse_config(
        config("motion_lora", tmp_path / "lora", clips) | {"motion_module": str(module)}
    )
    assert Trainer(lora).noise.shared_noise == 0.4  # the module's own prior by default
    assert Trainer(parse_config(config("motion", tmp_path / "new", clips))).noise.shared_noise == 0


def test_train_text_encoder_trains_it_and_saves_a_loadable_base(tmp_path, clips):
    from animatediff import AnimationPipeline
    from animatediff.checkpoints.base import load_base

    base = Path(random_model().base)
    frozen = load_base(base).text_encoder.state_dict()
    out = tmp_path / "run"
    written = train(config("image_finetune", out, clips, train_text_encoder=True))
    assert written == [out / "unet", out / "text_encoder"]
    trained = load_base(base).text_encoder.__class__.from_pretrained(out / "text_encoder")
    changed = [k for k, v in trained.state_dict().items() if not torch.equal(v, frozen[k])]
    assert any("embeddings" in k for k in changed) and any("layers.1" in k for k in changed)
    # The run's folder completed into a base folder loads, with the trained encoder in it.
    folder = tmp_path / "base"
    shutil.copytree(base, folder)
    for part in ("unet", "text_encoder"):
        shutil.rmtree(folder / part)
        shutil.copytree(out / part, folder / part)
    pipe = AnimationPipeline.load(base=folder, motion_module=random_model().motion_module)
    for k, v in trained.state_dict().items():
        assert torch.equal(pipe.text_encoder.state_dict()[k], v), k
    # Without the option the encoder stays as it was and only the UNet is written.
    assert train(config("image_finetune", tmp_path / "plain", clips)) == [
        tmp_path / "plain" / "unet"
    ]
