"""The page's form values -> `Settings`, checking each value and saying which field is wrong.

Values arrive as the browser sent them: model choices are keys looked up in the library, numbers
are range-checked, uploads are decoded and stored in the result's folder. Every mistake raises
`UserError` with one line naming the field.
"""

from __future__ import annotations

import json
import math
import secrets
from pathlib import Path

from ..pipeline.presets import PRESET_CHOICES
from ..pipeline.schedulers import SCHEDULERS
from .jobs import UserError
from .library import ModelEntry, ModelLibrary, UnknownModel
from .settings import ControlNetUnit, Settings
from .uploads import DEFAULT_LIMIT, store_frames, store_image, store_video

LORA_SLOTS = 3
MOTION_LORA_SLOTS = 2
CONTROLNET_SLOTS = 2
CONTEXT_SCHEDULES = ("static", "uniform", "looped", "batched")
CONTEXT_FUSES = ("flat", "pyramid", "overlap-linear")
INTERPOLATIONS = ("linear", "slerp")
MAX_SEED = 2**63 - 1
MAX_STEPS = 500  # DDIM with steps_offset 1 fails at 1000 (timestep 1000 of 0..999)
UPLOAD_FIELDS = (
    "control_images",
    "init_image",
    "init_video",
    *(f"controlnet_{i}_images" for i in range(1, CONTROLNET_SLOTS + 1)),
)


def _number(values: dict, name: str, lo: float, hi: float, integer: bool = False) -> float | int:
    label = name.replace("_", " ")
    value = values.get(name)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{label}: {value!r} is not a number") from None
    if not math.isfinite(number) or not lo <= number <= hi:
        raise UserError(f"{label}: {value} is outside {lo:g} to {hi:g}")
    if integer and not number.is_integer():
        raise UserError(f"{label}: {value} is not a whole number")
    return int(number) if integer else number


def _choice(values: dict, name: str, options) -> str:
    value = values.get(name)
    if value not in options:
        raise UserError(
            f"{name.replace('_', ' ')}: {str(value)[:40]!r} is not one of {', '.join(options)}"
        )
    return value


def _model(values: dict, name: str, library: ModelLibrary, category: str) -> ModelEntry | None:
    key = values.get(name)
    if key in (None, ""):
        return None
    try:
        return library.get(key, category)
    except UnknownModel as e:
        raise UserError(str(e)) from None


class FormReader:
    """Reads one submission into `Settings`, storing uploads in `folder`."""

    def __init__(self, library: ModelLibrary, folder: Path, upload_limit: int = DEFAULT_LIMIT):
        self.library, self.folder, self.limit = library, folder, upload_limit
        self.stored: dict[str, str | list[str]] = {}  # upload field -> its stored copy

    def record(self, values: dict, settings: Settings) -> dict:
        """The form as submitted, for "use these settings": uploads replaced by their stored
        copies, the seed by the one used."""
        plain = (str, int, float, bool, list, type(None))
        record = {k: v for k, v in values.items() if k not in UPLOAD_FIELDS}
        record = {k: v for k, v in record.items() if isinstance(v, plain)}
        return {**record, **self.stored, "seed": settings.seed}

    def read(self, values: dict, dtype: str | None = None) -> Settings:
        size = self._size(values)
        models = self._models(values)
        prompt_map = self._prompt_map(values, size["num_frames"])
        prompt = str(values.get("prompt") or "").strip()
        if not prompt and prompt_map is None:
            raise UserError("prompt: write what the animation should show")
        return Settings(
            prompt=prompt,
            negative_prompt=str(values.get("negative_prompt") or "").strip(),
            prompt_map=prompt_map,
            prompt_tail=str(values.get("prompt_tail") or "").strip(),
            prompt_interpolation=_choice(values, "prompt_interpolation", INTERPOLATIONS),
            seed=self._seed(values),
            dtype=dtype,
            **size,
            **models,
            **self._sampling(values),
            **self._controls(values, size["num_frames"]),
        )

    # -- pieces --------------------------------------------------------------------------
    @staticmethod
    def _size(values: dict) -> dict:
        for name in ("width", "height"):
            value = _number(values, name, 8, 2048, integer=True)
            if value % 8:
                raise UserError(
                    f"{name}: {value} is not a multiple of 8 (try {value // 8 * 8 or 8})"
                )
        return dict(
            width=int(values["width"]),
            height=int(values["height"]),
            num_frames=_number(values, "frames", 1, 1024, integer=True),
        )

    @staticmethod
    def _seed(values: dict) -> int:
        seed = values.get("seed")
        if seed in (None, "", -1, "-1", -1.0):
            return secrets.randbelow(2**31)
        return _number(values, "seed", 0, MAX_SEED, integer=True)

    @staticmethod
    def _sampling(values: dict) -> dict:
        return dict(
            steps=_number(values, "steps", 1, MAX_STEPS, integer=True),
            guidance_scale=_number(values, "guidance_scale", 0, 50),
            scheduler=_choice(values, "scheduler", tuple(SCHEDULERS)),
            preset=_choice(values, "preset", ("", *PRESET_CHOICES)) or None,
            fps=_number(values, "fps", 1, 60),
            context_length=_number(values, "context_length", 0, 1024, integer=True),
            context_overlap=_number(values, "context_overlap", 0, 1023, integer=True),
            context_stride=_number(values, "context_stride", 1, 16, integer=True),
            context_schedule=_choice(values, "context_schedule", CONTEXT_SCHEDULES),
            context_fuse=_choice(values, "context_fuse", CONTEXT_FUSES),
            context_views=bool(values.get("context_views")),
            freenoise=bool(values.get("freenoise")),
            freeinit_iterations=_number(values, "freeinit_iterations", 0, 10, integer=True),
            motion_scale=_number(values, "motion_scale", 0, 5),
        )

    def _models(self, values: dict) -> dict:
        lib = self.library
        base = _model(values, "base", lib, "base")
        loras = []
        for i in range(1, LORA_SLOTS + 1):
            entry = _model(values, f"lora_{i}", lib, "lora")
            if entry is not None:
                loras.append((entry, _number(values, f"lora_{i}_strength", -5, 5)))
        motion_loras = []
        for i in range(1, MOTION_LORA_SLOTS + 1):
            entry = _model(values, f"motion_lora_{i}", lib, "motion_lora")
            if entry is not None:
                motion_loras.append((entry, _number(values, f"motion_lora_{i}_strength", -5, 5)))
        adapter = _model(values, "adapter", lib, "adapter")
        return dict(
            base=None if base is None or base.builtin else base,
            personal=_model(values, "personal", lib, "personal"),
            vae=_model(values, "vae", lib, "vae"),
            loras=tuple(loras),
            motion_module=_model(values, "motion_module", lib, "motion_module"),
            motion_loras=tuple(motion_loras),
            adapter=None if adapter is None else (adapter, _number(values, "adapter_scale", 0, 2)),
        )

    def _prompt_map(self, values: dict, num_frames: int) -> str | None:
        """The prompt-travel table's filled rows, stored as JSON (the CLI reads that file)."""
        rows = _rows(values.get("travel"))
        keyframes: dict[str, str] = {}
        for frame, text in rows:
            if not str(frame).strip() and not str(text).strip():
                continue
            try:
                index = int(float(str(frame).strip()))
            except ValueError:
                raise UserError(
                    f"prompt travel: frame {str(frame)[:20]!r} is not a number"
                ) from None
            if not -1 <= index < num_frames:
                raise UserError(
                    f"prompt travel: frame {index} is outside 0..{num_frames - 1} (-1: last)"
                )
            if not str(text).strip():
                raise UserError(f"prompt travel: frame {index} has no prompt")
            keyframes[str(index)] = str(text).strip()
        if not keyframes:
            return None
        path = self.folder / "prompt-map.json"
        path.write_text(json.dumps(keyframes, indent=2))
        return str(path)

    def _controls(self, values: dict, num_frames: int) -> dict:
        sparsectrl = _model(values, "sparsectrl", self.library, "sparsectrl")
        images = [p for p in values.get("control_images") or [] if p]
        if images and sparsectrl is None:
            raise UserError("SparseCtrl keyframes: choose a SparseCtrl encoder for them")
        stored = tuple(
            store_image(p, self.folder / f"keyframe-{i}.png", f"keyframe {i + 1}", self.limit)
            for i, p in enumerate(images)
        )
        if stored:
            self.stored["control_images"] = list(stored)
        frames = _frame_list(values.get("control_frames"), len(stored), num_frames)
        init_image, init_video = values.get("init_image"), values.get("init_video")
        if init_image and init_video:
            raise UserError("init: give an init image or an init video, not both")
        return dict(
            sparsectrl=sparsectrl,
            control_images=stored,
            control_frames=frames,
            control_scale=_number(values, "control_scale", 0, 5),
            controlnets=self._controlnets(values),
            init_image=self._store(
                store_image, values, "init_image", "init-image.png", "init image"
            ),
            init_video=self._store(store_video, values, "init_video", "init-video", "init video"),
            strength=_number(values, "strength", 0, 1),
        )

    def _store(self, store, values: dict, field: str, name: str, what: str) -> str | None:
        """Check and store one upload field's file (None when empty)."""
        if not values.get(field):
            return None
        self.stored[field] = store(values[field], self.folder / name, what, self.limit)
        return self.stored[field]

    def _controlnets(self, values: dict) -> tuple[ControlNetUnit, ...]:
        units = []
        for i in range(1, CONTROLNET_SLOTS + 1):
            model = _model(values, f"controlnet_{i}", self.library, "controlnet")
            upload = values.get(f"controlnet_{i}_images")
            if model is None and not upload:
                continue
            if model is None or not upload:
                raise UserError(f"ControlNet {i}: choose a ControlNet and upload its control video")
            field, what = f"controlnet_{i}_images", f"ControlNet {i} input"
            images = self._store(store_frames, values, field, f"control-{i}", what)
            start = _number(values, f"controlnet_{i}_start", 0, 1)
            end = _number(values, f"controlnet_{i}_end", 0, 1)
            if start > end:
                raise UserError(f"ControlNet {i}: start {start} is after end {end}")
            units.append(
                ControlNetUnit(
                    model, images, _number(values, f"controlnet_{i}_scale", 0, 5), start, end
                )
            )
        return tuple(units)


def _rows(table) -> list[tuple]:
    """A Dataframe's value (pandas, dict with "data", or a list of rows) as (frame, prompt)."""
    if table is None:
        return []
    if hasattr(table, "values") and hasattr(table, "columns"):  # pandas
        table = table.values.tolist()
    elif isinstance(table, dict):
        table = table.get("data") or []
    rows = []
    for row in table:
        cells = list(row) + ["", ""]
        rows.append(("" if cells[0] is None else cells[0], "" if cells[1] is None else cells[1]))
    return rows


def _frame_list(text, count: int, num_frames: int) -> tuple[int, ...]:
    """ "0, 15" -> (0, 15): one frame per keyframe image; empty: the images' own order."""
    parts = [p for p in str(text or "").replace(",", " ").split() if p]
    if not parts or not count:  # numbers left over without images are not used
        return ()
    try:
        frames = tuple(int(p) for p in parts)
    except ValueError:
        raise UserError(
            f"keyframe frames: {str(text)[:40]!r} is not a list of frame numbers"
        ) from None
    if len(frames) != count:
        raise UserError(f"keyframe frames: {len(frames)} frame numbers for {count} keyframe images")
    bad = [f for f in frames if not -num_frames <= f < num_frames]
    if bad:
        raise UserError(f"keyframe frames: {bad[0]} is outside 0..{num_frames - 1}")
    return frames
