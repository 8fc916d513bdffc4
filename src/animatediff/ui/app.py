"""The Gradio app: the page's events over `Service`. Submitting the form queues a job and
follows it (queued, step and ETA, result); every failure reaches the page as one line in the
message box (`#message`), never as a traceback.
"""

from __future__ import annotations

import asyncio
import logging
import time

import gradio as gr

from ..pipeline.presets import PRESETS
from .jobs import DONE, Job, UserError
from .library import native_size
from .markup import COPY_JS, CSS, done_html, message_html, progress_html, result_info
from .page import NONE, Page
from .results import Result
from .service import Service

log = logging.getLogger(__name__)
POLL_S = 0.25


class App(Page):
    """The page with its handlers (one instance per server)."""

    def __init__(self, service: Service):
        super().__init__(service)
        self.jobs: dict[str, Job] = {}  # running or queued jobs by id, for the cancel button

    # -- events ------------------------------------------------------------------------------
    def _wire(self, demo: gr.Blocks) -> None:
        self._wire_run()
        self._wire_form()
        self.gallery.select(
            self.show_result,
            inputs=[self.gallery_names],
            outputs=[*self._result_outputs(), self.message],
        )
        demo.load(self.gallery_update, outputs=[self.gallery, self.gallery_names])

    def _wire_run(self) -> None:
        """Generate (followed until done), cancel, and the result's buttons."""
        self.generate_btn.click(
            self.generate,
            inputs=list(self.fields.values()),
            outputs=[
                self.job_id,
                self.progress,
                self.message,
                self.generate_btn,
                self.cancel_btn,
                self.last_seed,
                self.gallery,
                self.gallery_names,
                *self._result_outputs(),
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
        self.copy_btn.click(
            lambda _: gr.update(visible=True),
            inputs=[self.command],
            outputs=[self.command],
            js=COPY_JS,
            queue=False,
        )
        self.reuse_btn.click(self.reuse, inputs=[self.shown], outputs=list(self.fields.values()))

    def _wire_form(self) -> None:
        """Seed buttons, the base's native size, rescanning the model folders."""
        self.random_seed_btn.click(lambda: -1, outputs=[self.seed], queue=False)
        self.reuse_seed_btn.click(
            lambda s: -1 if s is None else s,
            inputs=[self.last_seed],
            outputs=[self.seed],
            queue=False,
        )
        self.base.change(self.base_size, inputs=[self.base], outputs=[self.width, self.height])
        self.preset.change(
            preset_sampling,
            inputs=[self.preset],
            outputs=[self.fields[n] for n in ("scheduler", "steps", "guidance_scale")],
            queue=False,
        )
        self.rescan_btn.click(self.rescan, outputs=[*self.model_dropdowns.values(), self.message])

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
            self.progress: done_html(seconds),
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


def preset_sampling(name: str) -> tuple:
    """A named preset's sampler, steps and guidance, put into the form (which stays editable)."""
    if name not in PRESETS:  # none, or "auto": decided by the motion module at run time
        return gr.update(), gr.update(), gr.update()
    preset = PRESETS[name]
    return preset.scheduler, preset.num_inference_steps, preset.guidance_scale


def _category(field: str) -> str:
    """Dropdown field name -> library category (`lora_2` -> `lora`)."""
    for category in ("motion_lora", "controlnet", "lora"):
        if field.startswith(category):
            return category
    return field


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
