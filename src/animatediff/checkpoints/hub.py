"""Weights by name: local paths, short aliases and Hugging Face Hub ids, downloaded once into
huggingface_hub's cache and verified.

A spec is one of (first match wins):
- an existing local file or folder, returned as is;
- an alias from `ALIASES` (`v3`, `v2-zoom-in`, `lightning-4step`, `sd15`, ...);
- `owner/name[@revision]:path/in/repo`: one file, or one folder holding a diffusers model;
- `owner/name[@revision]`: a whole repo, reduced to the files this project loads for the kind
  (a diffusers folder: config and safetensors weights, no fp16 variants or .bin duplicates;
  a file kind: the repo's one weight file).
Anything else that looks like a path (`C:\\x`, `./x`, `a/b/c`, `a/b.ckpt`) is a missing file.

Network behaviour: offline (`offline=True`, or HF_HUB_OFFLINE) reads the cache only and fails at
once when a file is missing. Online, one listing request with a short timeout (HF_HUB_ETAG_TIMEOUT,
default 5 s) comes first: an unreachable Hub falls back to the cache or fails in seconds, instead
of huggingface_hub's retry loop. Every blob this module downloads is checked against the hash the
Hub named it by (sha256 for LFS files, git's sha1 for others); a mismatch is deleted.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name

from ..errors import CheckpointError, UsageError, first_keys

__all__ = [
    "ALIASES",
    "KINDS",
    "OFFICIAL_BACKUP_FILES",
    "OFFICIAL_FILES",
    "Alias",
    "aliases",
    "resolve",
    "resolve_official",
]

_log = logging.getLogger(__name__)

# Every model kind the CLI takes, with its name in messages.
KINDS = {
    "base": "base model",
    "motion_module": "motion module",
    "motion_lora": "MotionLoRA",
    "adapter": "domain adapter",
    "lora": "LoRA",
    "personal": "personalised model",
    "vae": "VAE",
    "controlnet": "ControlNet",
    "sparsectrl": "SparseCtrl encoder",
    "ip_adapter": "IP-Adapter",
    "image_encoder": "image encoder",
    "embedding": "embedding",
}
# Kinds whose loaders take a diffusers folder (config.json + weights); the others take one file
# (a VAE or SparseCtrl repo in diffusers' layout gives its weights file).
_FOLDER_KINDS = {"base", "motion_module", "controlnet", "image_encoder"}
_WEIGHT_SUFFIXES = (".safetensors", ".ckpt", ".pt", ".pth", ".bin")
_VARIANT = re.compile(r"\.(fp16|fp32|bf16|non_ema|ema)$")
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_DEFAULT_TIMEOUT = 5.0  # seconds for listing and metadata requests (huggingface_hub's is 10)


@dataclass(frozen=True)
class Alias:
    """A released file (or folder, or whole repo when `path` is empty) on the Hub."""

    kind: str
    repo: str
    path: str = ""

    @property
    def spec(self) -> str:
        return f"{self.repo}:{self.path}" if self.path else self.repo


# The official release (guoyww/AnimateDiff, animatediff/utils/util.py): what its `auto_download`
# fetches by file name, whatever folder a prompt config puts it in.
OFFICIAL_REPO = "guoyww/animatediff"
OFFICIAL_BACKUP_REPO = "guoyww/animatediff_t2i_backups"
_MOTION_LORAS = {
    "zoom-in": "ZoomIn",
    "zoom-out": "ZoomOut",
    "pan-left": "PanLeft",
    "pan-right": "PanRight",
    "tilt-up": "TiltUp",
    "tilt-down": "TiltDown",
    "rolling-clockwise": "RollingClockwise",
    "rolling-anticlockwise": "RollingAnticlockwise",
}
OFFICIAL_FILES = (
    "mm_sd_v14.ckpt",
    "mm_sd_v15.ckpt",
    "mm_sd_v15_v2.ckpt",
    "v3_sd15_mm.ckpt",
    *(f"v2_lora_{name}.ckpt" for name in _MOTION_LORAS.values()),
    "v3_sd15_adapter.ckpt",
    "v3_sd15_sparsectrl_rgb.ckpt",
    "v3_sd15_sparsectrl_scribble.ckpt",
)
OFFICIAL_BACKUP_FILES = (
    "realisticVisionV60B1_v51VAE.safetensors",
    "majicmixRealistic_v4.safetensors",
    "leosamsFilmgirlUltra_velvia20Lora.safetensors",
    "toonyou_beta3.safetensors",
    "majicmixRealistic_v5Preview.safetensors",
    "rcnzCartoon3d_v10.safetensors",
    "lyriel_v16.safetensors",
    "leosamsHelloworldXL_filmGrain20.safetensors",
    "TUSUN.safetensors",
)

_IP = "h94/IP-Adapter"
# Every file name the official script fetches by itself.
OFFICIAL_NAMES = frozenset((*OFFICIAL_FILES, *OFFICIAL_BACKUP_FILES))

ALIASES: dict[str, Alias] = {
    "v1": Alias("motion_module", OFFICIAL_REPO, "mm_sd_v15.ckpt"),
    "v1-4": Alias("motion_module", OFFICIAL_REPO, "mm_sd_v14.ckpt"),
    "v2": Alias("motion_module", OFFICIAL_REPO, "mm_sd_v15_v2.ckpt"),
    "v3": Alias("motion_module", OFFICIAL_REPO, "v3_sd15_mm.ckpt"),
    "v3-adapter": Alias("adapter", OFFICIAL_REPO, "v3_sd15_adapter.ckpt"),
    "v3-sparsectrl-rgb": Alias("sparsectrl", OFFICIAL_REPO, "v3_sd15_sparsectrl_rgb.ckpt"),
    "v3-sparsectrl-scribble": Alias(
        "sparsectrl", OFFICIAL_REPO, "v3_sd15_sparsectrl_scribble.ckpt"
    ),
    **{
        f"v2-{name}": Alias("motion_lora", OFFICIAL_REPO, f"v2_lora_{file}.ckpt")
        for name, file in _MOTION_LORAS.items()
    },
    **{
        f"lightning-{n}step": Alias(
            "motion_module",
            "ByteDance/AnimateDiff-Lightning",
            f"animatediff_lightning_{n}step_diffusers.safetensors",
        )
        for n in (1, 2, 4, 8)
    },
    "animatelcm": Alias("motion_module", "wangfuyun/AnimateLCM", "AnimateLCM_sd15_t2v.ckpt"),
    "animatelcm-lora": Alias(
        "lora", "wangfuyun/AnimateLCM", "AnimateLCM_sd15_t2v_lora.safetensors"
    ),
    "ip-adapter-sd15": Alias("ip_adapter", _IP, "models/ip-adapter_sd15.safetensors"),
    "ip-adapter-plus-sd15": Alias("ip_adapter", _IP, "models/ip-adapter-plus_sd15.safetensors"),
    "ip-adapter-plus-face-sd15": Alias(
        "ip_adapter", _IP, "models/ip-adapter-plus-face_sd15.safetensors"
    ),
    "ip-adapter-image-encoder": Alias("image_encoder", _IP, "models/image_encoder"),
    "sd15": Alias("base", "stable-diffusion-v1-5/stable-diffusion-v1-5"),
}
# Repos deleted from the Hub, and the maintained copies that replace them.
_MOVED = {"runwayml/stable-diffusion-v1-5": "stable-diffusion-v1-5/stable-diffusion-v1-5"}


def aliases(kind: str) -> dict[str, str]:
    """`{alias: "repo:path"}` of one kind, for `--help` and the UI."""
    _check_kind(kind)
    return {name: alias.spec for name, alias in ALIASES.items() if alias.kind == kind}


# --------------------------------------------------------------------------------------------
# Public entry points
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Ref:
    repo: str
    revision: str
    path: str  # a file or folder in the repo; "" is the whole repo
    label: str  # how messages name it


@dataclass(frozen=True)
class _Hub:
    offline: bool
    cache_dir: str | None
    endpoint: str | None
    timeout: float


def resolve(
    spec: str | os.PathLike[str],
    kind: str,
    *,
    offline: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> Path:
    """The local path of a model spec (see the module docstring), downloading it if needed.

    offline: None follows HF_HUB_OFFLINE. cache_dir/endpoint: None means huggingface_hub's
    (HF_HUB_CACHE, HF_ENDPOINT). Raises CheckpointError (a missing, unreachable, gated or corrupt
    file) or ValueError (an unknown kind, an alias of another kind), each one line."""
    _check_kind(kind)
    text = os.fspath(spec)
    local = Path(text).expanduser()
    if local.exists():
        return local
    if not isinstance(spec, str):  # a Path object is always a path
        raise CheckpointError(text, "file not found")
    return _fetch(_parse(text, kind), kind, _hub(offline, cache_dir, endpoint))


def resolve_official(
    path: str | os.PathLike[str],
    *,
    offline: bool | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    endpoint: str | None = None,
) -> Path:
    """A file named by an official prompt config (`models/Motion_Module/mm_sd_v15_v2.ckpt`):
    the local file if it exists, else the Hub copy the official script would download (matched
    by file name, as it does), kept in huggingface_hub's cache. Other missing files raise a
    CheckpointError saying where to get them."""
    text = os.fspath(path)
    local = Path(text).expanduser()
    if local.exists():
        return local
    name = re.split(r"[\\/]", text)[-1]
    if name in OFFICIAL_FILES:
        repo = OFFICIAL_REPO
    elif name in OFFICIAL_BACKUP_FILES:
        repo = OFFICIAL_BACKUP_REPO
    else:
        raise CheckpointError(text, _not_official(text, name))
    ref = _Ref(repo, "main", name, f"{text} ({repo}:{name})")
    return _fetch(ref, None, _hub(offline, cache_dir, endpoint))


def _not_official(text: str, name: str) -> str:
    if "DreamBooth_LoRA" in text or name.endswith(".safetensors"):
        return (
            f"file not found, and the official script does not download it (it fetches only "
            f"{len(OFFICIAL_BACKUP_FILES)} personalised models, from {OFFICIAL_BACKUP_REPO}): "
            f"the official configs took '{name}' from CivitAI (https://civitai.com); download it "
            f"there and save it as {text}"
        )
    return (
        f"file not found, and not one of the files the official script downloads from "
        f"{OFFICIAL_REPO} ({', '.join(OFFICIAL_FILES[:4])}, ...)"
    )


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; choose one of: {', '.join(KINDS)}")


def _hub(offline: bool | None, cache_dir, endpoint: str | None) -> _Hub:
    if offline is None:
        flag = os.environ.get("HF_HUB_OFFLINE", "")
        offline = flag.upper() in {"1", "ON", "YES", "TRUE"} or bool(constants.HF_HUB_OFFLINE)
    folder = os.fspath(cache_dir) if cache_dir is not None else None
    return _Hub(offline, folder, endpoint.rstrip("/") if endpoint else None, _timeout())


def _timeout() -> float:
    """HF_HUB_ETAG_TIMEOUT when the user set it; otherwise a short default of our own."""
    try:
        return float(os.environ["HF_HUB_ETAG_TIMEOUT"])
    except (KeyError, ValueError):
        return _DEFAULT_TIMEOUT


# --------------------------------------------------------------------------------------------
# Parsing a spec
# --------------------------------------------------------------------------------------------


def _parse(text: str, kind: str) -> _Ref:
    alias = ALIASES.get(text.lower())
    if alias is not None:
        if alias.kind != kind:
            raise UsageError(
                f"{text!r} is the alias of a {KINDS[alias.kind]} ({alias.spec}), not of a "
                f"{KINDS[kind]}"
            )
        return _Ref(alias.repo, "main", alias.path, f"{text} ({alias.spec})")
    head, _, path = (text, "", "") if _looks_like_path(text) else text.partition(":")
    repo, _, revision = head.partition("@")
    if not _REPO_ID.fullmatch(repo) or (not path and _has_file_suffix(repo)):
        raise CheckpointError(text, _not_found(kind))
    moved = _MOVED.get(repo.lower())
    if moved:
        _log.warning("%s was deleted from the Hugging Face Hub; using its copy %s", repo, moved)
        repo = moved
    return _Ref(repo, revision or "main", path.strip("/"), text)


def _looks_like_path(text: str) -> bool:
    drive = re.match(r"[A-Za-z]:($|[\\/])", text) is not None  # C:\x, C:/x
    return drive or "\\" in text or text.startswith((".", "/", "~"))


def _has_file_suffix(repo: str) -> bool:
    # `dir/model.safetensors` that does not exist is a missing file, not a repo id.
    return repo.lower().endswith((*_WEIGHT_SUFFIXES, ".yaml", ".json", ".gif", ".mp4"))


def _not_found(kind: str) -> str:
    names = ", ".join(aliases(kind)) or "none"
    return (
        f"file not found (not a local path, a Hub id such as owner/name or owner/name:file, "
        f"or a {KINDS[kind]} alias: {names})"
    )


# --------------------------------------------------------------------------------------------
# Fetching: the listing first (short timeout), then the files; the cache when offline
# --------------------------------------------------------------------------------------------


class _Unreachable(Exception):
    pass


def _fetch(ref: _Ref, kind: str | None, hub: _Hub) -> Path:
    if hub.offline:
        return _from_cache(ref, kind, hub, None)
    try:
        files = _listing(ref, hub)
    except _Unreachable as e:
        return _from_cache(ref, kind, hub, str(e))
    if ref.path in files:
        return _download_file(ref, ref.path, hub)
    wanted, target = _plan(files, ref, kind)
    if wanted == [target]:
        return _download_file(ref, target, hub)
    return _download_folder(ref, wanted, hub) / target


def _listing(ref: _Ref, hub: _Hub) -> list[str]:
    api = HfApi(endpoint=hub.endpoint)
    try:
        info = api.model_info(ref.repo, revision=ref.revision, timeout=hub.timeout)
    except Exception as e:
        if _is_network_error(e):
            raise _Unreachable(_reason(e)) from None
        raise _hub_error(e, ref, hub) from None
    return [s.rfilename for s in info.siblings or []]


def _download_file(ref: _Ref, path: str, hub: _Hub) -> Path:
    before = _blob_names(ref, hub)
    try:
        pointer = hf_hub_download(
            ref.repo,
            path,
            revision=ref.revision,
            cache_dir=hub.cache_dir,
            endpoint=hub.endpoint,
            etag_timeout=hub.timeout,
            local_files_only=hub.offline,
        )
    except Exception as e:
        raise _hub_error(e, ref, hub) from None
    _verify_new([Path(pointer)], before, ref)
    return Path(pointer)


def _download_folder(ref: _Ref, wanted: list[str], hub: _Hub) -> Path:
    before = _blob_names(ref, hub)
    try:
        folder = snapshot_download(
            ref.repo,
            revision=ref.revision,
            allow_patterns=wanted,
            cache_dir=hub.cache_dir,
            endpoint=hub.endpoint,
            etag_timeout=hub.timeout,
        )
    except Exception as e:
        raise _hub_error(e, ref, hub) from None
    _verify_new([Path(folder, name) for name in wanted], before, ref)
    return Path(folder)


def _from_cache(ref: _Ref, kind: str | None, hub: _Hub, unreachable: str | None) -> Path:
    """What the cache holds for `ref`, choosing files exactly as online."""
    cached = _local_hub(hub)
    if ref.path:
        try:
            return _download_file(ref, ref.path, cached)
        except CheckpointError:
            pass  # not a cached file: maybe a cached folder
    snapshot = _cached_snapshot(ref, cached)
    if snapshot is not None:
        files = sorted(
            p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()
        )
        try:
            wanted, target = _plan(files, ref, kind)
        except CheckpointError:
            pass
        else:
            if all((snapshot / name).is_file() for name in wanted):
                return snapshot / target
    raise _not_cached(ref, hub, unreachable)


def _local_hub(hub: _Hub) -> _Hub:
    return _Hub(True, hub.cache_dir, hub.endpoint, hub.timeout)


def _cached_snapshot(ref: _Ref, hub: _Hub) -> Path | None:
    try:
        # allow_patterns=[]: the snapshot folder of the cached revision, whatever it holds.
        folder = snapshot_download(
            ref.repo,
            revision=ref.revision,
            cache_dir=hub.cache_dir,
            local_files_only=True,
            allow_patterns=[],
        )
    except (LocalEntryNotFoundError, EntryNotFoundError, OfflineModeIsEnabled):
        return None
    return Path(folder)


def _not_cached(ref: _Ref, hub: _Hub, unreachable: str | None) -> CheckpointError:
    cache = hub.cache_dir or constants.HF_HUB_CACHE
    if unreachable is None:
        message = (
            f"not in the Hugging Face cache ({cache}) and offline mode is on (--offline or "
            f"HF_HUB_OFFLINE); run once online to download it"
        )
    else:
        endpoint = hub.endpoint or constants.ENDPOINT
        message = (
            f"cannot reach the Hugging Face Hub at {endpoint} ({unreachable}), and it is not "
            f"in the cache ({cache}); check the connection, or HF_ENDPOINT"
        )
    return CheckpointError(ref.label, message)


# --------------------------------------------------------------------------------------------
# Choosing the files of a repo that the project loads
# --------------------------------------------------------------------------------------------


def _plan(files: list[str], ref: _Ref, kind: str | None) -> tuple[list[str], str]:
    """(the files to fetch, the path to return: a folder or one of them) for `ref.path` in a
    repo listing `files`."""
    prefix = f"{ref.path}/" if ref.path else ""
    inside = [f[len(prefix) :] for f in files if f.startswith(prefix)]
    if not inside:
        raise CheckpointError(ref.label, _no_entry(files, ref))
    if kind == "base":
        chosen = _pipeline_files(inside, ref)
    elif kind in _FOLDER_KINDS and "config.json" in inside:
        chosen = _component_files(inside, "", ref)
    else:
        name = prefix + _single_weight(inside, ref)
        return [name], name
    return [prefix + name for name in chosen], ref.path


def _no_entry(files: list[str], ref: _Ref) -> str:
    close = difflib.get_close_matches(ref.path, files, n=3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return f"no file or folder '{ref.path}' in {ref.repo} ({len(files)} files){hint}"


def _pipeline_files(inside: list[str], ref: _Ref) -> list[str]:
    """A diffusers SD1.5 pipeline, reduced to the parts this project loads."""
    if "model_index.json" not in inside:
        raise CheckpointError(
            ref.label,
            "not a diffusers Stable Diffusion repo (no model_index.json); a single-file "
            "checkpoint goes to --personal as owner/name:FILE",
        )
    tokenizer = [f for f in inside if f.startswith("tokenizer/")]
    if not tokenizer:
        raise CheckpointError(ref.label, "the diffusers repo has no tokenizer/ folder")
    chosen = ["model_index.json", *tokenizer]
    if "scheduler/scheduler_config.json" in inside:
        chosen.append("scheduler/scheduler_config.json")
    for part in ("text_encoder", "unet", "vae"):
        chosen += _component_files(inside, part, ref)
    return chosen


def _component_files(inside: list[str], part: str, ref: _Ref) -> list[str]:
    """config.json and the weights of one diffusers folder: safetensors if any, else .bin; no
    variants (`model.fp16.safetensors`), shards and their index included."""
    prefix = f"{part}/" if part else ""
    names = [
        f[len(prefix) :] for f in inside if f.startswith(prefix) and "/" not in f[len(prefix) :]
    ]
    where = f"{part}/" if part else "the folder"
    if "config.json" not in names:
        raise CheckpointError(ref.label, f"{where} has no config.json")
    for suffix in (".safetensors", ".bin"):
        weights = [n for n in names if n.endswith(suffix) and "." not in n[: -len(suffix)]]
        index = f"{suffix}.index.json"
        weights += [n for n in names if n.endswith(index) and "." not in n[: -len(index)]]
        if weights:
            return [prefix + n for n in ["config.json", *sorted(weights)]]
    raise CheckpointError(ref.label, f"{where} has no .safetensors or .bin weights")


def _single_weight(inside: list[str], ref: _Ref) -> str:
    """The one weight file of a folder: variants and .ckpt/.bin twins of a .safetensors dropped."""
    weights = [f for f in inside if f.lower().endswith(_WEIGHT_SUFFIXES)]
    plain = [f for f in weights if not _VARIANT.search(PurePosixPath(f).stem)] or weights
    safe = {f.rsplit(".", 1)[0] for f in plain if f.endswith(".safetensors")}
    best = [f for f in plain if f.endswith(".safetensors") or f.rsplit(".", 1)[0] not in safe]
    if len(best) == 1:
        return best[0]
    if not best:
        raise CheckpointError(ref.label, "holds no weight files")
    folder = f"{ref.path}/" if ref.path else ""
    raise CheckpointError(
        ref.label,
        f"holds {len(best)} weight files ({first_keys(best, 4)}); name one as "
        f"{ref.repo}:{folder}FILE",
    )


# --------------------------------------------------------------------------------------------
# Verification: a blob is named by its hash; check the ones this call brought in
# --------------------------------------------------------------------------------------------


def _blobs_dir(ref: _Ref, hub: _Hub) -> Path:
    cache = Path(hub.cache_dir or constants.HF_HUB_CACHE).expanduser()
    return cache / repo_folder_name(repo_id=ref.repo, repo_type="model") / "blobs"


def _blob_names(ref: _Ref, hub: _Hub) -> set[str]:
    folder = _blobs_dir(ref, hub)
    return set(os.listdir(folder)) if folder.is_dir() else set()


def _verify_new(pointers: list[Path], before: set[str], ref: _Ref) -> None:
    for pointer in pointers:
        blob = Path(os.path.realpath(pointer))
        # Without symlinks (some Windows setups) files are copied and cannot be told apart.
        if blob.parent.name == "blobs" and blob.name not in before:
            _check_blob(blob, pointer, ref)


def _check_blob(blob: Path, pointer: Path, ref: _Ref) -> None:
    name = blob.name
    if re.fullmatch(r"[0-9a-f]{64}", name):
        algorithm, actual = "sha256", _digest(blob, hashlib.sha256())
    elif re.fullmatch(r"[0-9a-f]{40}", name):
        # A git blob id: sha1 of "blob <size>\0" and the content.
        header = f"blob {blob.stat().st_size}\0".encode()
        algorithm, actual = "git sha1", _digest(blob, hashlib.sha1(header))
    else:
        return
    if actual != name:
        blob.unlink(missing_ok=True)
        pointer.unlink(missing_ok=True)
        raise CheckpointError(
            ref.label,
            f"downloaded {pointer.name} is corrupt ({algorithm} {actual[:12]}..., the Hub "
            f"lists {name[:12]}...); it was deleted: run again to download it anew",
        )


def _digest(file: Path, h) -> str:
    with file.open("rb") as f:
        while chunk := f.read(1 << 23):
            h.update(chunk)
    return h.hexdigest()


# --------------------------------------------------------------------------------------------
# Errors: one line each
# --------------------------------------------------------------------------------------------


def _is_network_error(e: Exception) -> bool:
    if isinstance(e, HfHubHTTPError):
        return False
    if isinstance(e, (OfflineModeIsEnabled, ConnectionError, TimeoutError)):
        return True
    # The HTTP client's own errors (httpx in huggingface_hub 1.x, requests before).
    return type(e).__module__.split(".")[0] in {
        "httpx",
        "httpx2",
        "httpcore",
        "requests",
        "urllib3",
    }


def _reason(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def _hub_error(e: Exception, ref: _Ref, hub: _Hub) -> Exception:
    """A one-line CheckpointError for what huggingface_hub raised; other errors unchanged."""
    url = f"{hub.endpoint or constants.ENDPOINT}/{ref.repo}"
    if isinstance(e, GatedRepoError):
        message = (
            f"{ref.repo} is a gated repo: accept its terms at {url}, then log in with "
            f"`hf auth login` (`huggingface-cli login` before huggingface_hub 1.0) or set HF_TOKEN"
        )
    elif isinstance(e, RepositoryNotFoundError):
        message = (
            f"no repo {ref.repo} on the Hugging Face Hub (nor a local file of that name); "
            f"if it is private, log in with `hf auth login` or set HF_TOKEN"
        )
    elif isinstance(e, RevisionNotFoundError):
        message = f"{ref.repo} has no revision '{ref.revision}'"
    elif isinstance(e, LocalEntryNotFoundError):
        return _not_cached(ref, hub, None if hub.offline else _reason(e.__cause__ or e))
    elif isinstance(e, EntryNotFoundError):
        message = f"no file '{ref.path}' in {ref.repo}"
    elif isinstance(e, HfHubHTTPError) or _is_network_error(e):
        message = f"download from {url} failed ({_reason(e)}); run again to retry"
    elif isinstance(e, OSError) and "Consistency check failed" in str(e):
        message = f"download incomplete ({_reason(e)}); run again to retry"
    else:
        return e
    return CheckpointError(ref.label, message)
