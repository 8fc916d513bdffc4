"""Keep one pipeline loaded between generations and change only what a request changes.

- The base (with the personal checkpoint and VAE) is loaded once per choice of those three.
- Image LoRAs and the domain adapter are merged into the weights, as `AnimationPipeline.load`
  merges them; before another set is merged, the original weights of exactly the layers the
  previous set touched are put back (copies kept on the CPU), so no reload is needed and the
  result is bit-identical to loading afresh (in fp32; in fp16 a merge happens on the fp16
  weights, where `load` merges in fp32 before casting).
- A new motion module is hooked into the same 2D UNet (`MotionUNet`) and the old one's hooks
  removed; MotionLoRAs are hooks too, cached per motion module and re-attached in order.
"""

from __future__ import annotations

import gc
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from ..builtin.model import builtin_model
from ..checkpoints.adapters import attention_lora_pairs, check_targets
from ..checkpoints.io import load_state_dict
from ..checkpoints.lora import is_kohya, parse_attention_lora, parse_kohya_lora
from ..checkpoints.motion import load_motion_module
from ..control import load_controlnet, load_sparsectrl
from ..lora import LoRAPair, LoRASet, get_module, merge_lora
from ..motion.unet import MotionUNet
from ..pipeline import AnimationPipeline
from .settings import ModelSpec

Plan = list[tuple[nn.Module, dict[str, LoRAPair], float]]


class WeightBackup:
    """The original weights of every layer a merge touched, to put back exactly."""

    def __init__(self) -> None:
        self._saved: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def merge(self, model: nn.Module, pairs: dict[str, LoRAPair], strength: float) -> None:
        for path in pairs:
            weight = get_module(model, path).weight
            if id(weight) not in self._saved:
                self._saved[id(weight)] = (weight, weight.detach().to("cpu", copy=True))
        merge_lora(model, pairs, strength)  # the library's own merge: same arithmetic as load()

    @torch.no_grad()
    def restore(self) -> None:
        for weight, original in self._saved.values():
            weight.copy_(original)
        self._saved.clear()

    @property
    def layers(self) -> int:
        return len(self._saved)


class ModelManager:
    """`pipeline(spec)` returns the loaded pipeline for a `ModelSpec`, doing the least work.

    `loads` counts what was (re)loaded: "base", "merge", "motion_module", "motion_lora",
    "sparsectrl", "controlnets" (the tests read it). Not thread-safe: one worker uses it.
    """

    def __init__(self, device: str = "cpu", dtype: torch.dtype = torch.float32):
        self.device, self.dtype = device, dtype
        self.pipe: AnimationPipeline | None = None
        self.loads: Counter = Counter()
        self._keys: dict[str, object] = {}
        self._backup = WeightBackup()
        self._motion_loras: dict[tuple, LoRASet] = {}

    def pipeline(self, spec: ModelSpec, status: Callable[[str], None] = lambda _: None):
        """The pipeline for `spec`; on failure the next call starts from a clean state."""
        try:
            self._ensure_base(spec, status)
            self._ensure_merges(spec, status)
            self._ensure_motion_module(spec, status)
            self._ensure_motion_loras(spec, status)
            self._ensure_controls(spec, status)
        except BaseException:
            self._forget_partial()
            raise
        self.pipe.sources = _sources(spec)
        return self.pipe

    def _changed(self, name: str, key: object) -> bool:
        return name not in self._keys or self._keys[name] != key

    def _forget_partial(self) -> None:
        """A step that failed left its key unset, so the next call redoes it; weights that may
        be half merged are put back now."""
        if self.pipe is not None and "merge" not in self._keys:
            self._backup.restore()

    # -- base ------------------------------------------------------------------------------
    def _ensure_base(self, spec: ModelSpec, status) -> None:
        key = (spec.base, spec.personal, spec.vae)
        if not self._changed("base", key):
            return
        status("loading the base model")
        self._release()
        self.pipe = AnimationPipeline.load(
            base=spec.base,
            motion_module=spec.motion_module,
            personal=spec.personal,
            vae=spec.vae,
            dtype=self.dtype,
            device=self.device,
        )
        self.loads["base"] += 1
        self._keys = dict(
            base=key,
            merge=((), None),
            motion_module=spec.motion_module,
            motion_loras=(),
            sparsectrl=None,
            controlnets=(),
        )

    def _release(self) -> None:
        self.pipe, self._keys = None, {}
        self._backup = WeightBackup()
        self._motion_loras.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # -- image LoRAs and the domain adapter ------------------------------------------------
    def _ensure_merges(self, spec: ModelSpec, status) -> None:
        key = (spec.loras, spec.adapter)
        if not self._changed("merge", key):
            return
        status("applying LoRAs")
        self._backup.restore()
        self._keys.pop("merge", None)  # nothing merged now; set again once all merges are done
        for model, pairs, strength in self._merge_plan(spec):  # every file checked first
            self._backup.merge(model, pairs, strength)
        self.loads["merge"] += 1
        self._keys["merge"] = key

    def _merge_plan(self, spec: ModelSpec) -> Plan:
        """What `AnimationPipeline.load` merges, in its order: image LoRAs (UNet, then text
        encoder), then the adapter."""
        unet, text = self.pipe.unet.unet, self.pipe.text_encoder
        plan: Plan = []
        for path, strength in spec.loras:
            sd = load_state_dict(path)
            if is_kohya(sd):
                unet_pairs, text_pairs = parse_kohya_lora(sd, path, unet, text, "kohya")
            else:
                unet_pairs, text_pairs = parse_attention_lora(sd, path), {}
            check_targets(unet, unet_pairs, path, "LoRA")
            check_targets(text, text_pairs, path, "LoRA")
            plan += [(unet, unet_pairs, strength), (text, text_pairs, strength)]
        if spec.adapter is not None:
            path, scale = spec.adapter
            plan.append((unet, attention_lora_pairs(unet, path, "domain adapter"), scale))
        return plan

    # -- motion module and MotionLoRAs -----------------------------------------------------
    def _ensure_motion_module(self, spec: ModelSpec, status) -> None:
        if not self._changed("motion_module", spec.motion_module):
            return
        status("loading the motion module")
        path = spec.motion_module or builtin_model().motion_module
        motion = load_motion_module(path).to(self.device, self.dtype)
        old = self.pipe.unet
        for lora in self.pipe.motion_loras.values():
            lora.detach()
        self.pipe.motion_loras = {}
        self._keys["motion_loras"] = ()
        new = MotionUNet(old.unet, motion)  # checks the fit before hooking anything
        old.remove()
        self.pipe.unet = new
        self.loads["motion_module"] += 1
        self._keys["motion_module"] = spec.motion_module

    def _ensure_motion_loras(self, spec: ModelSpec, status) -> None:
        wanted = spec.motion_loras
        current = self._keys.get("motion_loras")
        if current is not None and [p for p, _ in wanted] == [p for p, _ in current]:
            for name, (_, strength) in zip(list(self.pipe.motion_loras), wanted):
                self.pipe.set_motion_lora_strength(name, strength)
            self._keys["motion_loras"] = wanted
            return
        status("attaching MotionLoRAs")
        self._keys.pop("motion_loras", None)
        for name in list(self.pipe.motion_loras):
            self.pipe.remove_motion_lora(name)
        for path, strength in wanted:  # in order: the hooks add up in attach order
            self.pipe.add_motion_lora(self._motion_lora(spec, path), strength, Path(path).stem)
        self._keys["motion_loras"] = wanted

    def _motion_lora(self, spec: ModelSpec, path: str) -> LoRASet:
        key = (spec.motion_module, path)
        if key not in self._motion_loras:
            motion = self.pipe.unet.motion
            pairs = attention_lora_pairs(motion, path, "MotionLoRA")
            self._motion_loras[key] = LoRASet.from_pairs(motion, pairs)
            self.loads["motion_lora"] += 1
        return self._motion_loras[key]

    # -- SparseCtrl and ControlNets --------------------------------------------------------
    def _ensure_controls(self, spec: ModelSpec, status) -> None:
        unet = self.pipe.unet.unet
        if self._changed("sparsectrl", spec.sparsectrl):
            self._keys.pop("sparsectrl", None)
            self.pipe.sparsectrl = None
            if spec.sparsectrl is not None:
                status("loading SparseCtrl")
                encoder = load_sparsectrl(spec.sparsectrl, unet)
                self.pipe.sparsectrl = encoder.to(self.device, self.dtype)
                self.loads["sparsectrl"] += 1
            self._keys["sparsectrl"] = spec.sparsectrl
        if self._changed("controlnets", spec.controlnets):
            self._keys.pop("controlnets", None)
            self.pipe.controlnets = []
            if spec.controlnets:
                status("loading ControlNets")
                nets = [load_controlnet(p, unet) for p in spec.controlnets]
                self.pipe.controlnets = [n.to(self.device, self.dtype) for n in nets]
                self.loads["controlnets"] += 1
            self._keys["controlnets"] = spec.controlnets


def _sources(spec: ModelSpec) -> dict:
    """What the saved settings say was loaded (like `AnimationPipeline.sources`)."""
    model = builtin_model()
    return dict(
        base=spec.base or str(model.base),
        motion_module=spec.motion_module or str(model.motion_module),
        personal=spec.personal,
        vae=spec.vae,
        loras=[list(x) for x in spec.loras],
        adapter=None if spec.adapter is None else list(spec.adapter),
        motion_loras=[list(x) for x in spec.motion_loras],
        sparsectrl=spec.sparsectrl,
        controlnets=list(spec.controlnets),
    )
