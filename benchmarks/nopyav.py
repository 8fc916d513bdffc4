"""Import before `animatediff` where PyAV may be missing (the GPU image holds only torch,
transformers, accelerate, safetensors, einops and imageio): the package's video input/output
imports `av`, which the benchmarks never call, so an empty module stands in for it."""

import importlib.machinery
import sys
import types

try:
    import av  # noqa: F401
except ImportError:
    placeholder = types.ModuleType("av")
    placeholder.__spec__ = importlib.machinery.ModuleSpec("av", None)  # probes look for one
    sys.modules["av"] = placeholder
