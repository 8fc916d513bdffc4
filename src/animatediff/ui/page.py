"""The page's layout: the form (prompt, sampling, tabs of models, long videos, prompt travel
and control), the output panel and the gallery. `App` (app.py) adds the events."""

from __future__ import annotations

import html

import gradio as gr

from ..pipeline.presets import PRESET_CHOICES
from ..pipeline.schedulers import SCHEDULERS
from .form import (
    CONTEXT_FUSES,
    CONTEXT_SCHEDULES,
    CONTROLNET_SLOTS,
    INTERPOLATIONS,
    LORA_SLOTS,
    MOTION_LORA_SLOTS,
)
from .markup import progress_html
from .service import Service

NONE = ("none", "")


class Page:
    """Builds the Blocks; the form's inputs are `fields` (name -> component), in order."""

    def __init__(self, service: Service):
        self.service = service
        self.fields: dict[str, gr.components.Component] = {}
        self.model_dropdowns: dict[str, gr.Dropdown] = {}  # field name -> dropdown

    def build(self) -> gr.Blocks:
        with gr.Blocks(
            title="AnimateDiff", analytics_enabled=False, delete_cache=(3600, 86400)
        ) as demo:
            self.job_id = gr.State(None)
            self.last_seed = gr.State(None)
            self.shown = gr.State(None)  # the folder name of the result on display
            self.gallery_names = gr.State([])
            gr.Markdown(f"## AnimateDiff\n{html.escape(self._about())}")
            with gr.Row(equal_height=False):
                with gr.Column(scale=5):
                    self._prompt_inputs()
                    self._sampling_inputs()
                    with gr.Tabs():
                        self._models_tab()
                        self._long_tab()
                        self._travel_tab()
                        self._control_tab()
                with gr.Column(scale=4):
                    self._output_panel()
            self.gallery = gr.Gallery(
                label="Results of this server",
                elem_id="gallery",
                columns=8,
                height=300,
                fit_columns=False,
                allow_preview=False,
                object_fit="contain",
            )
            self._wire(demo)
        return demo

    def _about(self) -> str:
        svc = self.service
        folders = ", ".join(str(f) for f in svc.library.folders) or "none (built-in models only)"
        return f"Device: {svc.device}. Model folders: {folders}. Outputs: {svc.results.root}"

    def _field(self, name: str, component):
        self.fields[name] = component
        return component

    def _prompt_inputs(self) -> None:
        f = self._field
        f(
            "prompt",
            gr.Textbox(
                label="Prompt",
                lines=3,
                elem_id="prompt",
                placeholder="a red circle moving on a blue background",
            ),
        )
        f(
            "negative_prompt",
            gr.Textbox(label="Negative prompt", lines=1, elem_id="negative-prompt"),
        )
        with gr.Row():
            self.generate_btn = gr.Button("Generate", variant="primary", elem_id="generate")
            self.cancel_btn = gr.Button(
                "Cancel", variant="stop", elem_id="cancel", interactive=False
            )

    def _dropdown(self, name: str, label: str, category: str, optional: bool = True, **kw):
        choices = ([NONE] if optional else []) + self.service.library.choices(category)
        value = "" if optional else choices[0][1]
        dropdown = gr.Dropdown(
            choices, value=value, label=label, elem_id=name.replace("_", "-"), **kw
        )
        self.model_dropdowns[name] = dropdown
        return self._field(name, dropdown)

    def _models_tab(self) -> None:
        with gr.Tab("Models"):
            with gr.Row():
                self.base = self._dropdown("base", "Base model", "base", optional=False)
                self._dropdown("motion_module", "Motion module", "motion_module", optional=False)
            with gr.Row():
                self._dropdown("personal", "Personal model / style", "personal")
                self._dropdown("vae", "VAE", "vae")
            self._weighted_slots("lora", "Image LoRA", "lora", LORA_SLOTS)
            self._weighted_slots("motion_lora", "MotionLoRA", "motion_lora", MOTION_LORA_SLOTS)
            with gr.Group(), gr.Row():
                self._dropdown("adapter", "Domain adapter (v3)", "adapter", scale=3)
                self._field(
                    "adapter_scale", gr.Slider(0, 1, 1.0, step=0.05, label="scale", scale=2)
                )
            self.rescan_btn = gr.Button("Rescan model folders", size="sm")

    def _weighted_slots(self, prefix: str, label: str, category: str, count: int) -> None:
        """`count` rows of (model, strength), named `prefix_1`, `prefix_1_strength`, ..."""
        with gr.Group():
            for i in range(1, count + 1):
                with gr.Row():
                    self._dropdown(f"{prefix}_{i}", f"{label} {i}", category, scale=3)
                    strength = gr.Slider(-2, 2, 1.0, step=0.05, label="strength", scale=2)
                    self._field(f"{prefix}_{i}_strength", strength)

    def _sampling_inputs(self) -> None:
        f = self._field
        with gr.Row():
            f("frames", gr.Number(16, label="Frames", precision=0, minimum=1, elem_id="frames"))
            self.width = f(
                "width", gr.Number(64, label="Width", precision=0, step=8, elem_id="width")
            )
            self.height = f(
                "height", gr.Number(64, label="Height", precision=0, step=8, elem_id="height")
            )
            f("steps", gr.Number(25, label="Steps", precision=0, minimum=1, elem_id="steps"))
        with gr.Row():
            f("guidance_scale", gr.Number(7.5, label="Guidance", step=0.5, elem_id="guidance"))
            f(
                "scheduler",
                gr.Dropdown(list(SCHEDULERS), value="ddim", label="Scheduler", elem_id="scheduler"),
            )
            presets = [("none", ""), *((p, p) for p in PRESET_CHOICES)]
            self.preset = f(
                "preset", gr.Dropdown(presets, value="", label="Few-step preset", elem_id="preset")
            )
            f("fps", gr.Number(8, label="FPS", minimum=1, elem_id="fps"))
        with gr.Row(equal_height=True):
            self.seed = f(
                "seed", gr.Number(-1, label="Seed (-1: random)", precision=0, elem_id="seed")
            )
            self.random_seed_btn = gr.Button(
                "Random", size="sm", scale=0, min_width=90, elem_id="random-seed"
            )
            self.reuse_seed_btn = gr.Button(
                "Last seed", size="sm", scale=0, min_width=90, elem_id="reuse-seed"
            )

    def _long_tab(self) -> None:
        f = self._field
        with gr.Tab("Long videos"):
            with gr.Row():
                f(
                    "context_length",
                    gr.Number(16, label="Context length (0: all frames)", precision=0),
                )
                f("context_overlap", gr.Number(4, label="Overlap", precision=0))
                f("context_stride", gr.Number(1, label="Stride", precision=0))
            with gr.Row():
                f(
                    "context_schedule",
                    gr.Dropdown(list(CONTEXT_SCHEDULES), value="static", label="Schedule"),
                )
                f("context_fuse", gr.Dropdown(list(CONTEXT_FUSES), value="pyramid", label="Fusion"))
                f("context_views", gr.Checkbox(False, label="Window only the motion modules"))
            with gr.Row():
                f("freenoise", gr.Checkbox(False, label="FreeNoise"))
                f("freeinit_iterations", gr.Number(0, label="FreeInit iterations", precision=0))
                f("motion_scale", gr.Slider(0, 2, 1.0, step=0.05, label="Motion scale"))

    def _travel_tab(self) -> None:
        f = self._field
        with gr.Tab("Prompt travel"):
            gr.Markdown(
                "One prompt per keyframe (frame -1 is the last); frames in between blend. "
                "When rows are filled, the main prompt is put before each of them."
            )
            f(
                "travel",
                gr.Dataframe(
                    headers=["frame", "prompt"],
                    datatype=["number", "str"],
                    row_count=3,
                    column_count=2,
                    type="array",
                    elem_id="travel",
                    interactive=True,
                ),
            )
            with gr.Row():
                f("prompt_tail", gr.Textbox(label="Added after each keyframe prompt"))
                f(
                    "prompt_interpolation",
                    gr.Dropdown(list(INTERPOLATIONS), value="linear", label="Interpolation"),
                )

    def _control_tab(self) -> None:
        with gr.Tab("Control"):
            self._sparsectrl_inputs()
            for i in range(1, CONTROLNET_SLOTS + 1):
                self._controlnet_inputs(i)
            self._init_inputs()

    def _sparsectrl_inputs(self) -> None:
        f = self._field
        gr.Markdown("**SparseCtrl keyframes**")
        with gr.Row():
            self._dropdown("sparsectrl", "SparseCtrl encoder", "sparsectrl")
            f("control_scale", gr.Slider(0, 2, 1.0, step=0.05, label="scale"))
        with gr.Row():
            images = gr.File(
                label="Keyframe images",
                file_count="multiple",
                file_types=["image"],
                elem_id="control-images",
            )
            f("control_images", images)
            f("control_frames", gr.Textbox(label="Their frames (e.g. 0, 15)"))

    def _controlnet_inputs(self, i: int) -> None:
        f = self._field
        gr.Markdown(f"**ControlNet {i}**")
        with gr.Row():
            self._dropdown(f"controlnet_{i}", "ControlNet", "controlnet")
            images = gr.File(label="Control video or image", file_types=["video", "image"])
            f(f"controlnet_{i}_images", images)
        with gr.Row():
            f(f"controlnet_{i}_scale", gr.Slider(0, 2, 1.0, step=0.05, label="scale"))
            f(f"controlnet_{i}_start", gr.Slider(0, 1, 0.0, step=0.05, label="start"))
            f(f"controlnet_{i}_end", gr.Slider(0, 1, 1.0, step=0.05, label="end"))

    def _init_inputs(self) -> None:
        f = self._field
        gr.Markdown("**Init image / video** (img2vid, vid2vid)")
        with gr.Row():
            f("init_image", gr.File(label="Init image", file_types=["image"], elem_id="init-image"))
            f("init_video", gr.File(label="Init video", file_types=["video"], elem_id="init-video"))
            f("strength", gr.Slider(0, 1, 0.8, step=0.05, label="strength"))

    def _output_panel(self) -> None:
        self.progress = gr.HTML(progress_html(None), elem_id="progress")
        self.message = gr.HTML("", elem_id="message")
        self.result = gr.Image(
            label="Animation",
            type="filepath",
            elem_id="result",
            interactive=False,
            buttons=["fullscreen"],
        )
        with gr.Row():
            self.gif_btn = gr.DownloadButton("GIF", elem_id="download-gif", interactive=False)
            self.mp4_btn = gr.DownloadButton("MP4", elem_id="download-mp4", interactive=False)
            self.config_btn = gr.DownloadButton(
                "Save as config", elem_id="save-config", interactive=False
            )
            self.copy_btn = gr.Button("Copy as command", elem_id="copy-command", interactive=False)
        with gr.Row():
            self.info = gr.Markdown("", elem_id="result-info")
            self.reuse_btn = gr.Button(
                "Use these settings",
                size="sm",
                scale=0,
                elem_id="reuse-settings",
                interactive=False,
            )
        self.command = gr.Code(
            "",
            language="shell",
            label="Command",
            visible=False,
            elem_id="command",
            interactive=False,
            buttons=["copy"],
        )
        with gr.Accordion("All settings", open=False):
            self.settings = gr.JSON(label="Settings", elem_id="settings")

    def _wire(self, demo: gr.Blocks) -> None:
        """Hook for the events, called inside the Blocks (`App` defines them)."""
