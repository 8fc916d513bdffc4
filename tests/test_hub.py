"""animatediff.checkpoints.hub against a fake Hub on 127.0.0.1 (tests/fakehub.py): the real
huggingface_hub client downloads from it into a temporary cache; nothing touches the network."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from fakehub import FakeHub
from huggingface_hub import constants
from safetensors.torch import load_file

from animatediff.checkpoints import hub as hubmod
from animatediff.checkpoints.hub import (
    ALIASES,
    OFFICIAL_BACKUP_FILES,
    OFFICIAL_FILES,
    aliases,
    resolve,
    resolve_official,
)
from animatediff.checkpoints.io import CheckpointError

MM = "guoyww/animatediff"


@pytest.fixture()
def fake(tmp_path, monkeypatch):
    """A running fake Hub, and `fetch(spec, kind, **kw)`: `resolve` against it with an empty
    cache in tmp_path."""
    for name in ("HF_HUB_OFFLINE", "HF_HUB_ETAG_TIMEOUT", "HF_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    with FakeHub(tmp_path / "repos") as hub:
        hub.cache = tmp_path / "cache"

        def fetch(spec, kind, **kw):
            kw.setdefault("endpoint", hub.url)
            return resolve(spec, kind, cache_dir=hub.cache, **kw)

        hub.fetch = fetch
        yield hub


def one_line_error(call, match: str, exc=CheckpointError) -> str:
    with pytest.raises(exc, match=match) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    return message


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# -- single files ----------------------------------------------------------------------------------
def test_repo_file_downloads_once_into_the_cache(fake):
    data = os.urandom(50_000)
    fake.add(MM, "mm_sd_v15_v2.ckpt", data)
    path = fake.fetch(f"{MM}:mm_sd_v15_v2.ckpt", "motion_module")
    assert path.read_bytes() == data
    assert fake.cache in path.parents and path.name == "mm_sd_v15_v2.ckpt"
    assert fake.served("GET").count(f"/{MM}/resolve/main/mm_sd_v15_v2.ckpt") == 1

    fake.requests.clear()
    assert fake.fetch(f"{MM}:mm_sd_v15_v2.ckpt", "motion_module") == path
    assert f"/{MM}/resolve/main/mm_sd_v15_v2.ckpt" not in fake.served("GET")  # from the cache
    fake.requests.clear()
    assert fake.fetch(f"{MM}:mm_sd_v15_v2.ckpt", "motion_module", offline=True) == path
    assert fake.requests == []


def test_file_in_a_folder_and_a_revision(fake):
    fake.add("h94/IP-Adapter", "models/ip-adapter_sd15.safetensors", b"x" * 100)
    path = fake.fetch("h94/IP-Adapter:models/ip-adapter_sd15.safetensors", "ip_adapter")
    assert path.parts[-2:] == ("models", "ip-adapter_sd15.safetensors")
    commit = fake.commit("h94/IP-Adapter")
    pinned = fake.fetch(f"h94/IP-Adapter@{commit}:models/ip-adapter_sd15.safetensors", "ip_adapter")
    assert pinned.read_bytes() == b"x" * 100 and commit in pinned.parts


def test_a_file_kind_repo_gives_its_one_weight_file(fake):
    fake.add("someone/style", "README.md", b"# a LoRA")
    fake.add("someone/style", "style.safetensors", b"s" * 64)
    fake.add("someone/style", "style.ckpt", b"c" * 64)  # the same weights, pickled
    fake.add("someone/style", "style.fp16.safetensors", b"h" * 32)
    assert fake.fetch("someone/style", "lora").name == "style.safetensors"
    fake.add("stabilityai/sd-vae-ft-mse", "config.json", b"{}")  # a VAE loads from its file
    fake.add("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.safetensors", b"v" * 64)
    fake.add("stabilityai/sd-vae-ft-mse", "diffusion_pytorch_model.bin", b"b" * 64)
    vae = fake.fetch("stabilityai/sd-vae-ft-mse", "vae")
    assert vae.name == "diffusion_pytorch_model.safetensors" and vae.read_bytes() == b"v" * 64
    fake.add("someone/style", "other.safetensors", b"o" * 64)
    message = one_line_error(lambda: fake.fetch("someone/style", "lora"), "holds 2 weight files")
    assert "other.safetensors" in message and "someone/style:FILE" in message


# -- whole repos -----------------------------------------------------------------------------------
SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"
DECOYS = {  # files a diffusers SD1.5 repo has that this project never loads
    "v1-5-pruned-emaonly.ckpt",
    "v1-5-pruned-emaonly.safetensors",
    "README.md",
    "safety_checker/config.json",
    "safety_checker/model.safetensors",
    "feature_extractor/preprocessor_config.json",
    "text_encoder/model.fp16.safetensors",
    "text_encoder/pytorch_model.bin",
    "unet/diffusion_pytorch_model.fp16.safetensors",
    "unet/diffusion_pytorch_model.non_ema.safetensors",
    "unet/diffusion_pytorch_model.bin",
    "vae/diffusion_pytorch_model.fp16.safetensors",
}


def add_tiny_sd15(fake, repo: str = SD15) -> set[str]:
    """The built-in random SD1.5 model as a Hub repo with the usual extra files; returns the
    files that should be downloaded."""
    from animatediff.builtin.model import random_model

    base = random_model().base
    wanted = set()
    for file in base.rglob("*"):
        if file.is_file():
            wanted.add(file.relative_to(base).as_posix())
            fake.add(repo, file.relative_to(base).as_posix(), file.read_bytes())
    for name in DECOYS:
        fake.add(repo, name, b"decoy " + name.encode())
    return wanted


def snapshot_files(folder: Path) -> set[str]:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


def test_base_repo_downloads_only_what_the_project_loads(fake):
    wanted = add_tiny_sd15(fake)
    folder = fake.fetch(SD15, "base")
    assert snapshot_files(folder) == wanted
    assert not any(url.endswith(tuple(DECOYS)) for url in fake.served("GET"))
    fake.requests.clear()
    assert fake.fetch("sd15", "base", offline=True) == folder  # the alias, from the cache
    assert fake.requests == []


@pytest.mark.slow  # importing diffusers and transformers is most of it
def test_downloaded_base_loads(fake):
    from animatediff.builtin.model import random_model
    from animatediff.checkpoints.base import load_base

    add_tiny_sd15(fake)
    loaded = load_base(fake.fetch(SD15, "base"))
    for part in ("unet", "vae", "text_encoder"):
        file = "model" if part == "text_encoder" else "diffusion_pytorch_model"
        want = load_file(random_model().base / part / f"{file}.safetensors")
        got = getattr(loaded, part).state_dict()
        assert all(got[k].equal(v) for k, v in want.items()), part


@pytest.mark.parametrize(
    "repo, kind",
    [
        ("lllyasviel/control_v11p_sd15_openpose", "controlnet"),
        ("guoyww/animatediff-motion-adapter-v1-5-2", "motion_module"),
    ],
)
def test_diffusers_model_repo_is_config_and_safetensors(fake, repo, kind):
    fake.add(repo, "config.json", b'{"_class_name": "X"}')
    fake.add(repo, "diffusion_pytorch_model.safetensors", b"w" * 256)
    fake.add(repo, "diffusion_pytorch_model.fp16.safetensors", b"h" * 128)
    fake.add(repo, "diffusion_pytorch_model.bin", b"b" * 256)
    fake.add(repo, "images/example.png", b"png")
    folder = fake.fetch(repo, kind)
    assert snapshot_files(folder) == {"config.json", "diffusion_pytorch_model.safetensors"}


def test_folder_inside_a_repo(fake):
    repo = "h94/IP-Adapter"
    fake.add(repo, "models/image_encoder/config.json", b"{}")
    fake.add(repo, "models/image_encoder/model.safetensors", b"m" * 100)
    fake.add(repo, "models/image_encoder/pytorch_model.bin", b"p" * 100)
    fake.add(repo, "models/ip-adapter_sd15.safetensors", b"i" * 10)
    folder = fake.fetch("ip-adapter-image-encoder", "image_encoder")
    assert folder.parts[-2:] == ("models", "image_encoder")
    assert snapshot_files(folder) == {"config.json", "model.safetensors"}
    fake.requests.clear()
    assert fake.fetch("ip-adapter-image-encoder", "image_encoder", offline=True) == folder
    assert fake.requests == []


# -- aliases ---------------------------------------------------------------------------------------
def test_alias_table_names_the_released_files():
    expected = {
        "v1": f"{MM}:mm_sd_v15.ckpt",
        "v1-4": f"{MM}:mm_sd_v14.ckpt",
        "v2": f"{MM}:mm_sd_v15_v2.ckpt",
        "v3": f"{MM}:v3_sd15_mm.ckpt",
        "v3-adapter": f"{MM}:v3_sd15_adapter.ckpt",
        "v3-sparsectrl-rgb": f"{MM}:v3_sd15_sparsectrl_rgb.ckpt",
        "v2-rolling-anticlockwise": f"{MM}:v2_lora_RollingAnticlockwise.ckpt",
        "lightning-4step": "ByteDance/AnimateDiff-Lightning:"
        "animatediff_lightning_4step_diffusers.safetensors",
        "animatelcm-lora": "wangfuyun/AnimateLCM:AnimateLCM_sd15_t2v_lora.safetensors",
        "ip-adapter-plus-face-sd15": "h94/IP-Adapter:models/ip-adapter-plus-face_sd15.safetensors",
        "sd15": SD15,
    }
    table = {name: alias.spec for name, alias in ALIASES.items()}
    assert {name: table[name] for name in expected} == expected
    # Every alias of the official repo names a file the official script knows.
    assert all(a.path in OFFICIAL_FILES for a in ALIASES.values() if a.repo == MM)
    assert len(aliases("motion_lora")) == 8
    assert set(aliases("sparsectrl")) == {"v3-sparsectrl-rgb", "v3-sparsectrl-scribble"}
    with pytest.raises(ValueError, match="unknown model kind"):
        aliases("unet")


def test_every_alias_downloads_its_file(fake):
    for alias in ALIASES.values():
        if alias.kind in ("base", "image_encoder"):
            continue  # folders: covered above
        fake.add(alias.repo, alias.path, hashlib.sha256(alias.spec.encode()).digest())
    for name, alias in ALIASES.items():
        if alias.kind in ("base", "image_encoder"):
            continue
        path = fake.fetch(name, alias.kind)
        assert path.as_posix().endswith("/" + alias.path)
        assert path.read_bytes() == hashlib.sha256(alias.spec.encode()).digest()


def test_alias_of_another_kind_is_refused(fake):
    one_line_error(
        lambda: fake.fetch("v2-zoom-in", "motion_module"), "alias of a MotionLoRA", ValueError
    )
    assert fake.requests == []


# -- offline and unreachable -----------------------------------------------------------------------
def test_offline_reads_the_cache_only(fake, monkeypatch):
    fake.add(MM, "v3_sd15_mm.ckpt", b"3" * 1000)
    message = one_line_error(
        lambda: fake.fetch("v3", "motion_module", offline=True), "not in the Hugging Face cache"
    )
    assert message.startswith(f"v3 ({MM}:v3_sd15_mm.ckpt)") and "offline" in message
    assert fake.requests == []
    cached = fake.fetch("v3", "motion_module")
    fake.requests.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert fake.fetch("v3", "motion_module") == cached
    one_line_error(lambda: fake.fetch("v2", "motion_module"), "not in the Hugging Face cache")
    assert fake.requests == []


def test_unreachable_hub_fails_in_seconds(fake):
    dead = f"http://127.0.0.1:{closed_port()}"
    start = time.monotonic()
    message = one_line_error(
        lambda: fake.fetch("v2", "motion_module", endpoint=dead),
        "cannot reach the Hugging Face Hub",
    )
    assert time.monotonic() - start < 5
    assert dead in message and "not in the cache" in message
    fake.add(MM, "mm_sd_v15_v2.ckpt", b"2" * 1000)
    cached = fake.fetch("v2", "motion_module")
    assert fake.fetch("v2", "motion_module", endpoint=dead) == cached  # the cached copy serves


def test_silent_hub_times_out_after_hf_hub_etag_timeout(fake, monkeypatch):
    monkeypatch.setenv("HF_HUB_ETAG_TIMEOUT", "1")
    with socket.socket() as silent:  # accepts connections, never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        endpoint = f"http://127.0.0.1:{silent.getsockname()[1]}"
        start = time.monotonic()
        one_line_error(lambda: fake.fetch("v2", "motion_module", endpoint=endpoint), "cannot reach")
        assert time.monotonic() - start < 4


# -- errors ----------------------------------------------------------------------------------------
def test_hub_errors_are_one_line(fake):
    fake.add(MM, "mm_sd_v15_v2.ckpt", b"2" * 100)
    one_line_error(lambda: fake.fetch("nobody/nothing", "motion_module"), "no repo nobody/nothing")
    message = one_line_error(
        lambda: fake.fetch(f"{MM}:mm_sd_v15_v3.ckpt", "motion_module"), "no file or folder"
    )
    assert "did you mean mm_sd_v15_v2.ckpt" in message
    one_line_error(
        lambda: fake.fetch(f"{MM}@v9:mm_sd_v15_v2.ckpt", "motion_module"), "no revision 'v9'"
    )
    fake.gated.add(MM)
    one_line_error(
        lambda: fake.fetch(f"{MM}:mm_sd_v15_v2.ckpt", "motion_module"), "gated.*hf auth login"
    )


@pytest.mark.parametrize(
    "spec",
    [
        "C:\\models\\mm.ckpt",
        "C:/models/mm.ckpt",
        "models/Motion_Module/mm.ckpt",
        "models/mm.ckpt",
        "./a/b",
        "no-such-alias",
    ],
)
def test_missing_paths_are_not_downloads(fake, spec):
    message = one_line_error(lambda: fake.fetch(spec, "motion_module"), "file not found")
    assert message.startswith(spec)
    assert fake.requests == []


def test_local_path_always_wins(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "v2").write_bytes(b"local")
    (tmp_path / MM).mkdir(parents=True)
    assert resolve("v2", "motion_module", endpoint=fake.url) == Path("v2")
    assert resolve(MM, "motion_module", endpoint=fake.url) == Path(MM)
    missing = tmp_path / "owner" / "name"
    with pytest.raises(CheckpointError, match="file not found"):
        resolve(missing.relative_to(tmp_path), "lora", endpoint=fake.url)  # a Path is a path
    assert fake.requests == []


def test_deleted_runwayml_repo_maps_to_the_maintained_copy(fake, caplog):
    wanted = add_tiny_sd15(fake)
    with caplog.at_level(logging.WARNING, logger=hubmod.__name__):
        folder = fake.fetch("runwayml/stable-diffusion-v1-5", "base")
    assert snapshot_files(folder) == wanted and "models--stable-diffusion-v1-5" in str(folder)
    assert [r.getMessage() for r in caplog.records] == [
        f"runwayml/stable-diffusion-v1-5 was deleted from the Hugging Face Hub; using its copy {SD15}"
    ]


# -- verification and resuming ---------------------------------------------------------------------
def test_interrupted_download_resumes(fake):
    size = 2 * constants.DOWNLOAD_CHUNK_SIZE + 12345  # the client writes whole chunks
    data = os.urandom(size)
    fake.add(MM, "v3_sd15_mm.ckpt", data)
    fake.drop_once.add(f"{MM}/v3_sd15_mm.ckpt")
    path = fake.fetch("v3", "motion_module")
    assert path.read_bytes() == data
    ranges = [r for m, p, r in fake.requests if m == "GET" and p.endswith("v3_sd15_mm.ckpt")]
    assert ranges == [None, f"bytes={constants.DOWNLOAD_CHUNK_SIZE}-"]


def test_corrupted_download_is_refused_and_deleted(fake):
    data = os.urandom(4096)
    fake.add(MM, "v3_sd15_adapter.ckpt", data)
    fake.corrupt.add(f"{MM}/v3_sd15_adapter.ckpt")
    message = one_line_error(lambda: fake.fetch("v3-adapter", "adapter"), "corrupt .*sha256")
    assert hashlib.sha256(data).hexdigest()[:12] in message
    blobs = fake.cache / f"models--{MM.replace('/', '--')}" / "blobs"
    assert list(blobs.iterdir()) == []
    fake.corrupt.clear()
    assert fake.fetch("v3-adapter", "adapter").read_bytes() == data  # and a retry succeeds


def test_corrupted_small_file_in_a_folder_is_refused(fake):
    repo = "lllyasviel/control_v11p_sd15_openpose"
    fake.add(repo, "config.json", b'{"_class_name": "ControlNetModel"}')
    fake.add(repo, "diffusion_pytorch_model.safetensors", b"w" * 256)
    fake.corrupt.add(f"{repo}/config.json")  # not LFS: named by its git sha1
    one_line_error(lambda: fake.fetch(repo, "controlnet"), "corrupt .*git sha1")


# -- official prompt configs -----------------------------------------------------------------------
def test_resolve_official_downloads_what_the_official_script_does(fake, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fake.add(MM, "mm_sd_v15_v2.ckpt", b"2" * 500)
    fake.add(hubmod.OFFICIAL_BACKUP_REPO, "toonyou_beta3.safetensors", b"t" * 500)
    kw = dict(cache_dir=fake.cache, endpoint=fake.url)
    path = resolve_official("models/Motion_Module/mm_sd_v15_v2.ckpt", **kw)
    assert path.read_bytes() == b"2" * 500 and fake.cache in path.parents
    assert resolve_official("models/DreamBooth_LoRA/toonyou_beta3.safetensors", **kw).exists()
    assert "toonyou_beta3.safetensors" in OFFICIAL_BACKUP_FILES
    message = one_line_error(
        lambda: resolve_official("models/DreamBooth_LoRA/moonfilm_reality20.safetensors", **kw),
        "CivitAI",
    )
    assert "moonfilm_reality20.safetensors" in message
    local = tmp_path / "models" / "Motion_Module" / "v3_sd15_mm.ckpt"
    local.parent.mkdir(parents=True, exist_ok=True)
    local.write_bytes(b"mine")
    fake.requests.clear()
    assert resolve_official("models/Motion_Module/v3_sd15_mm.ckpt", **kw) == Path(
        "models/Motion_Module/v3_sd15_mm.ckpt"
    )
    assert fake.requests == []


# -- the environment, as the CLI uses it -----------------------------------------------------------
def test_hf_endpoint_and_hf_home_from_the_environment(fake, tmp_path):
    fake.add(MM, "mm_sd_v15_v2.ckpt", b"2" * 300)
    env = {**os.environ, "HF_ENDPOINT": fake.url, "HF_HOME": str(tmp_path / "home")}
    env.pop("HF_HUB_OFFLINE", None)
    src = Path(__file__).parents[1] / "src"
    env["PYTHONPATH"] = os.pathsep.join([str(src), env.get("PYTHONPATH", "")])
    code = textwrap.dedent(
        """
        from animatediff.checkpoints.hub import resolve
        print(resolve("v2", "motion_module"))
        """
    )
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    path = Path(out.stdout.strip())
    assert (tmp_path / "home" / "hub") in path.parents and path.read_bytes() == b"2" * 300
    shutil.rmtree(tmp_path / "home")
