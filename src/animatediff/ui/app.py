"""The Gradio page: a form, a live progress bar, the result and a gallery, over `Service`.

Everything the page sends is checked by `form.py`; every failure reaches the page as one line
in the message box (`#message`), never as a traceback.
"""

from __future__ import annotations

import asyncio
import html
import logging
import time

import gradio as gr

from ..pipeline.schedulers import SCHEDULERS
from .form import (
    CONTEXT_FUSES,
    CONTEXT_SCHEDULES,
    CONTROLNET_SLOTS,
    INTERPOLATIONS,
    LORA_SLOTS,
    MOTION_LORA_SLOTS,
)
from .jobs import DONE, QUEUED, Job, UserError
from .library import native_size
from .results import Result
from .service import Service

log = logging.getLogger(__name__)
POLL_S = 0.25
NONE = ("none", "")

CSS = """
#result img { image-rendering: pixelated; min-height: 256px; object-fit: contain; }
.ad-progress { font-variant-numeric: tabular-nums; padding: 4px 0; }
.ad-bar { height: 10px; border-radius: 5px; background: var(--neutral-200); overflow: hidden; }
.ad-fill { height: 100%; background: var(--color-accent); transition: width .2s; }
.ad-message { padding: 8px 12px; border-radius: 6px; }
.ad-error { background: #fde8e8; color: #9b1c1c; border: 1px solid #f8b4b4; }
.ad-note { background: var(--neutral-100); }
"""


# -- small HTML pieces ---------------------------------------------------------------------------
def progress_html(job: Job | None, ahead: int = 0) -> str:
    """The progress box: queued (with the line ahead), loading, step N/M with ETA, done."""
    if job is None:
        return '<div class="ad-progress" data-state="idle"></div>'
    if job.state == QUEUED:
        text = f"Queued: {ahead} generation{'s' if ahead != 1 else ''} ahead"
        return _progress(job.state, 0, text)
    if job.phase != "denoising" or not job.total:
        return _progress(job.state, 0, html.escape(job.phase.capitalize()) + "...")
    eta = job.eta()
    text = f"Step {job.step} / {job.total}"
    if job.passes > 1:
        text += f" (pass {job.pass_index + 1} of {job.passes})"
    if eta is not None:
        text += f" &middot; ETA {eta:.0f} s"
    done = (job.pass_index * job.total + job.step) / (
        max(job.passes, job.pass_index + 1) * job.total
    )
    return _progress(job.state, 100 * done, text, job.step, job.total)


def _progress(state: str, percent: float, text: str, step: int = 0, total: int = 0) -> str:
    return (
        f'<div class="ad-progress" data-state="{state}" data-step="{step}" data-total="{total}">'
        f'<div class="ad-bar"><div class="ad-fill" style="width:{percent:.0f}%"></div></div>'
        f"<span>{text}</span></div>"
    )


def message_html(text: str, error: bool = True) -> str:
    if not text:
        return ""
    kind = "ad-error" if error else "ad-note"
    return f'<div class="ad-message {kind}" role="alert">{html.escape(text)}</div>'


def result_info(result: Result, seconds: float | None = None) -> str:
    s = result.settings
    parts = [
        f"**Seed** `{s.get('seed')}`",
        f"{s.get('num_frames')} frames",
        f"{s.get('width')}x{s.get('height')}",
        f"{s.get('num_inference_steps')} steps",
        str(s.get("scheduler")),
        f"guidance {s.get('guidance_scale')}",
    ]
    if seconds is not None:
        parts.append(f"{seconds:.1f} s")
    return " &middot; ".join(parts)


class App:
    """Builds the Blocks and holds the handlers (one instance per server)."""

    def __init__(self, service: Service):
        self.service = service
        self.jobs: dict[str, Job] = {}  # running or queued jobs by id, for the cancel button
        self.fields: dict[str, gr.components.Component] = {}
        self.model_dropdowns: dict[str, gr.Dropdown] = {}  # field name -> dropdown

    # -- layout ----------------------------------------------------------------------------
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
        f = self._field
        with gr.Tab("Control"):
            gr.Markdown("**SparseCtrl keyframes**")
            with gr.Row():
                self._dropdown("sparsectrl", "SparseCtrl encoder", "sparsectrl")
                f("control_scale", gr.Slider(0, 2, 1.0, step=0.05, label="scale"))
            with gr.Row():
                f(
                    "control_images",
                    gr.File(
                        label="Keyframe images",
                        file_count="multiple",
                        file_types=["image"],
                        elem_id="control-images",
                    ),
                )
                f("control_frames", gr.Textbox(label="Their frames (e.g. 0, 15)"))
            for i in range(1, CONTROLNET_SLOTS + 1):
                gr.Markdown(f"**ControlNet {i}**")
                with gr.Row():
                    self._dropdown(f"controlnet_{i}", "ControlNet", "controlnet")
                    f(
                        f"controlnet_{i}_images",
                        gr.File(label="Control video or image", file_types=["video", "image"]),
                    )
                with gr.Row():
                    f(f"controlnet_{i}_scale", gr.Slider(0, 2, 1.0, step=0.05, label="scale"))
                    f(f"controlnet_{i}_start", gr.Slider(0, 1, 0.0, step=0.05, label="start"))
                    f(f"controlnet_{i}_end", gr.Slider(0, 1, 1.0, step=0.05, label="end"))
            gr.Markdown("**Init image / video** (img2vid, vid2vid)")
            with gr.Row():
                f(
                    "init_image",
                    gr.File(label="Init image", file_types=["image"], elem_id="init-image"),
                )
                f(
                    "init_video",
                    gr.File(label="Init video", file_types=["video"], elem_id="init-video"),
                )
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

    # -- events ------------------------------------------------------------------------------
    def _wire(self, demo: gr.Blocks) -> None:
        inputs = list(self.fields.values())
        result_outputs = self._result_outputs()
        self.generate_btn.click(
            self.generate,
            inputs=inputs,
            outputs=[
                self.job_id,
                self.progress,
                self.message,
                self.generate_btn,
                self.cancel_btn,
                self.last_seed,
                self.gallery,
                self.gallery_names,
                *result_outputs,
            ],
            concurrency_limit=None,  # the worker queues; each page follows its own job
            show_progress="hidden",
        )
        self.cancel_btn.click(
            self.cancel,
            inputs=[self.job_id],
            outputs=[self.message],
            queue=False,
            show_progress="hidden",
        )
        self.random_seed_btn.click(lambda: -1, outputs=[self.seed], queue=False)
        self.reuse_seed_btn.click(
            lambda s: -1 if s is None else s,
            inputs=[self.last_seed],
            outputs=[self.seed],
            queue=False,
        )
        self.base.change(self.base_size, inputs=[self.base], outputs=[self.width, self.height])
        self.rescan_btn.click(self.rescan, outputs=[*self.model_dropdowns.values(), self.message])
        self.copy_btn.click(
            lambda _: gr.update(visible=True),
            inputs=[self.command],
            outputs=[self.command],
            js=COPY_JS,
            queue=False,
        )
        self.gallery.select(
            self.show_result, inputs=[self.gallery_names], outputs=result_outputs + [self.message]
        )
        self.reuse_btn.click(self.reuse, inputs=[self.shown], outputs=list(self.fields.values()))
        demo.load(self.gallery_update, outputs=[self.gallery, self.gallery_names])

    def _result_outputs(self) -> list:
        return [
            self.result,
            self.gif_btn,
            self.mp4_btn,
            self.config_btn,
            self.copy_btn,
            self.info,
            self.command,
            self.settings,
            self.shown,
            self.reuse_btn,
        ]

    # -- handlers ----------------------------------------------------------------------------
    async def generate(self, *values):
        """Submit, then follow the job: progress while queued or running, then the result."""
        form = dict(zip(self.fields, values))
        try:
            job, settings = self.service.submit(form)
        except UserError as e:
            yield {self.message: message_html(str(e)), self.progress: progress_html(None)}
            return
        self.jobs[job.id] = job
        yield {
            self.job_id: job.id,
            self.message: "",
            self.last_seed: settings.seed,
            self.generate_btn: gr.update(interactive=False),
            self.cancel_btn: gr.update(interactive=True),
            self.progress: progress_html(job, self.service.worker.ahead(job)),
        }
        started = time.monotonic()
        try:
            last = None
            while not job.finished.is_set():
                await asyncio.sleep(POLL_S)
                box = progress_html(job, self.service.worker.ahead(job))
                if box != last:
                    yield {self.progress: box}
                    last = box
        finally:
            if not job.finished.is_set():  # the page went away: free the device
                self.service.worker.cancel(job)
            self.jobs.pop(job.id, None)
        yield self._finished(job, time.monotonic() - started)

    def _finished(self, job: Job, seconds: float) -> dict:
        done = {
            self.job_id: None,
            self.cancel_btn: gr.update(interactive=False),
            self.generate_btn: gr.update(interactive=True),
        }
        if job.state != DONE:
            return {
                **done,
                self.progress: progress_html(None),
                self.message: message_html(job.message),
            }
        gallery, names = self.gallery_update()
        return {
            **done,
            **self._show(job.result, seconds),
            self.gallery: gallery,
            self.gallery_names: names,
            self.message: "",
            self.progress: _progress("done", 100, f"Done in {seconds:.1f} s"),
        }

    def _show(self, result: Result, seconds: float | None = None) -> dict:
        config = result.config
        return {
            self.result: str(result.gif),
            self.gif_btn: gr.update(value=str(result.gif), interactive=True),
            self.mp4_btn: gr.update(value=str(result.mp4), interactive=True),
            self.config_btn: gr.update(
                value=str(config) if config else None, interactive=config is not None
            ),
            self.copy_btn: gr.update(interactive=True),
            self.info: result_info(result, seconds),
            self.command: gr.update(value=result.command, visible=False),
            self.settings: result.settings,
            self.shown: result.name,
            self.reuse_btn: gr.update(interactive=bool(result.settings.get("form"))),
        }

    def reuse(self, name: str | None) -> list:
        """The form as it was for the result on display (fields it lacks stay as they are)."""
        result = self.service.results.get(name) if name else None
        form = result.settings.get("form", {}) if result else {}
        return [form[n] if n in form else gr.update() for n in self.fields]

    def cancel(self, job_id: str | None) -> str:
        job = self.jobs.get(job_id) if job_id else None
        if job is None:
            return message_html("nothing to cancel", error=False)
        self.service.worker.cancel(job)
        return message_html("cancelling...", error=False)

    def base_size(self, key: str):
        try:
            size = native_size(self.service.library.get(key, "base"))
        except (ValueError, OSError):
            return gr.update(), gr.update()
        return size, size

    def rescan(self) -> list:
        self.service.library.scan()
        updates = []
        for name in self.model_dropdowns:
            optional = name not in ("base", "motion_module")
            choices = ([NONE] if optional else []) + self.service.library.choices(_category(name))
            updates.append(gr.update(choices=choices))
        skipped = self.service.library.skipped
        note = (
            f"{len(skipped)} unreadable files skipped (see the server log)"
            if skipped
            else "rescanned"
        )
        return updates + [message_html(note, error=False)]

    def gallery_update(self):
        results = self.service.results.list()
        return [(str(r.gif), r.caption()) for r in results], [r.name for r in results]

    def show_result(self, names: list[str], event: gr.SelectData):
        index = event.index if isinstance(event.index, int) else None
        result = (
            self.service.results.get(names[index])
            if index is not None and index < len(names)
            else None
        )
        if result is None:
            return {self.message: message_html("that result is no longer there; reload the page")}
        return {**self._show(result), self.message: ""}


def _category(field: str) -> str:
    """Dropdown field name -> library category (`lora_2` -> `lora`)."""
    for category in ("motion_lora", "controlnet", "lora"):
        if field.startswith(category):
            return category
    return field


COPY_JS = """
(command) => {
  try { navigator.clipboard.writeText(command); } catch (e) {}
  return command;
}
"""


def launch(
    service: Service,
    host: str,
    port: int,
    auth=None,
    max_file_size: int | None = None,
    block: bool = True,
):
    """Start the server; returns the Blocks (with `block=False`, at once)."""
    demo = App(service).build()
    demo.queue(max_size=64)
    demo.launch(
        server_name=host,
        server_port=port,
        auth=auth,
        max_file_size=max_file_size,
        allowed_paths=[str(service.results.root)],
        show_error=False,
        prevent_thread_lock=not block,
        footer_links=[],
        css=CSS,
        ssr_mode=False,
        quiet=False,
    )
    return demo
