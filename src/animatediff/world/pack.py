"""Copy a finished build into the package (`animatediff/builtin/data`), in fp16, in the layouts
users' files come in: a diffusers base folder, a motion module and adapter in the official
layout, personal styles as single-file LDM checkpoints, one style as a kohya LoRA, and
MotionLoRAs in the official MotionLoRA layout; `manifest.json` names them."""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel

from ..builtin import PACKAGE_DATA
from ..checkpoints.base import load_base
from ..checkpoints.export import kohya_from_official, save_single_file
from ..checkpoints.fewstep import release_from_metadata
from ..checkpoints.io import load_state_dict, read_metadata, save_state_dict, tensors_sha256
from .recipe import DATA, LORA_STUDIES, MOTION_LORAS, MOTION_RUN, STYLE_LORA
from .report import save_results
from .styles import STYLES

DISTILL = "consistency distillation, docs/distill/distill.yaml"


def _half(src: Path, dst: Path) -> None:
    """A safetensors file in fp16, metadata kept (a motion module's config lives there)."""
    sd = {k: v.half() if v.is_floating_point() else v for k, v in load_state_dict(src).items()}
    save_state_dict(sd, dst, metadata=read_metadata(src), overwrite=True)


def _base_folder(src: Path, dst: Path) -> None:
    for name in ("tokenizer", "scheduler"):
        shutil.copytree(src / name, dst / name)
    shutil.copy(src / "model_index.json", dst / "model_index.json")
    kw = dict(torch_dtype=torch.float16)
    UNet2DConditionModel.from_pretrained(src / "unet", **kw).save_pretrained(dst / "unet")
    AutoencoderKL.from_pretrained(src / "vae", **kw).save_pretrained(dst / "vae")
    CLIPTextModel.from_pretrained(src / "text_encoder", **kw).save_pretrained(dst / "text_encoder")


def _motion_lora(runs: Path, tmp: Path, name: str, manifest: dict, info: dict) -> None:
    file = f"motion_loras/{name}.safetensors"
    _half(runs / f"motion-lora-{name}" / "motion_lora.safetensors", tmp / file)
    config = json.loads((runs / f"motion-lora-{name}" / "config.json").read_text())
    info = {"clips": DATA["motion_lora_clips"], "rank": config["train"]["rank"], **info}
    manifest["motion_loras"][name] = {"file": file, **info, "steps": config["train"]["steps"]}


def pack(work: Path, target: Path = PACKAGE_DATA) -> Path:
    runs = work / "runs"
    tmp = Path(tempfile.mkdtemp(prefix=".pack-", dir=target.parent))
    _base_folder(work / "base", tmp / "base")
    _half(runs / MOTION_RUN / "motion_module.safetensors", tmp / "motion_module.safetensors")
    _half(runs / "adapter" / "domain_adapter.safetensors", tmp / "domain_adapter.safetensors")
    manifest: dict = {"personal": {}, "motion_loras": {}}
    base = load_base(work / "base")
    for style in STYLES:
        unet = UNet2DConditionModel.from_pretrained(runs / f"personal-{style}" / "unet")
        file = f"personal/{style}.safetensors"
        (tmp / "personal").mkdir(exist_ok=True)
        save_single_file(unet, base.vae, base.text_encoder, tmp / file)
        manifest["personal"][style] = {"file": file, "kind": "checkpoint"}
    (tmp / "loras").mkdir()
    lora = f"loras/{STYLE_LORA}-lora.safetensors"
    kohya_from_official(runs / f"lora-{STYLE_LORA}" / "domain_adapter.safetensors", tmp / lora)
    manifest["personal"][f"{STYLE_LORA}-lora"] = {"file": lora, "kind": "lora"}
    (tmp / "motion_loras").mkdir()
    for name in MOTION_LORAS:
        _motion_lora(runs, tmp, name, manifest, {"kind": name})
    for name, study in LORA_STUDIES.items():  # the rank / clip-count study, for `evaluate`
        if (runs / f"motion-lora-{name}" / "motion_lora.safetensors").exists():
            _motion_lora(runs, tmp, name, manifest, {**study, "study": True})
    baseline = runs / "motion-image-layers"
    if (baseline / "motion_module.safetensors").exists():  # the ablation, for `evaluate`
        (tmp / "baseline").mkdir()
        _half(
            baseline / "motion_module.safetensors", tmp / "baseline" / "motion_module.safetensors"
        )
        UNet2DConditionModel.from_pretrained(
            baseline / "unet", torch_dtype=torch.float16
        ).save_pretrained(tmp / "baseline" / "unet")
    _carry_students(target, tmp, manifest)
    (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    size = sum(f.stat().st_size for f in target.rglob("*") if f.is_file())
    print(f"packed {target}: {size / 2**20:.1f} MiB")
    return target


def add_student(name: str, run: Path, target: Path = PACKAGE_DATA, method: str = DISTILL) -> dict:
    """Ship a few-step student (a `distill` run's output folder `run`) under `name`, in fp16,
    its image-layer LoRA beside it when the run made one; its manifest entry records the packed
    motion module it was distilled from (by `tensors_sha256`), so that a later repack keeps it
    only while that teacher ships."""
    module = run / "motion_module.safetensors"
    release = release_from_metadata(read_metadata(module))
    if release is None or not release.steps:
        raise ValueError(f"{module}: not a distilled motion module (no release steps)")
    entry = {"file": f"motion_modules/{name}.safetensors", "steps": release.steps}
    (target / "motion_modules").mkdir(exist_ok=True)
    _half(module, target / entry["file"])
    if (run / "distill_lora.safetensors").exists():
        entry["adapter"] = f"motion_modules/{name}-lora.safetensors"
        _half(run / "distill_lora.safetensors", target / entry["adapter"])
    teacher = target / "motion_module.safetensors"
    entry.update(
        teacher=teacher.name,
        teacher_tensors_sha256=tensors_sha256(teacher),
        method=method,
    )
    manifest = json.loads((target / "manifest.json").read_text())
    manifest.setdefault("motion_modules", {})[name] = entry
    save_results(manifest, target / "manifest.json")  # last, and atomically
    return entry


def _carry_students(target: Path, tmp: Path, manifest: dict) -> None:
    """Keep the shipped few-step students (docs/distill/) whose teacher is still the packed
    motion module; a student of another teacher is dropped, saying so (distil it again)."""
    old = target / "manifest.json"
    students = json.loads(old.read_text()).get("motion_modules", {}) if old.exists() else {}
    teacher = tensors_sha256(tmp / "motion_module.safetensors")
    for name, entry in students.items():
        if entry.get("teacher_tensors_sha256") != teacher:
            print(f"dropped {name}: distilled from another motion module; distil it again")
            continue
        for file in (entry["file"], entry.get("adapter")):
            if file is not None:
                (tmp / file).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(target / file, tmp / file)
        manifest.setdefault("motion_modules", {})[name] = entry
