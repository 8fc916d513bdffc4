"""What the page asks of the server, without the page: submit a form, follow the job, list
results. The Gradio app (`app.py`) is a thin layer over this."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from .form import FormReader
from .jobs import Job, Worker
from .library import ModelLibrary, default_cache_file
from .models import ModelManager
from .results import Result, Results
from .settings import Settings
from .uploads import DEFAULT_LIMIT

log = logging.getLogger(__name__)


class Service:
    """The model library, the loaded models, the queue and the results of one server."""

    def __init__(
        self,
        model_folders=(),
        outputs: str | Path = "outputs/ui",
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        dtype_flag: str | None = None,
        upload_limit: int = DEFAULT_LIMIT,
        max_queue: int = 32,
    ):
        self.results = Results(outputs)
        self.library = ModelLibrary(model_folders, default_cache_file())
        self.manager = ModelManager(device, dtype)
        self.worker = Worker(max_queue)
        self.device, self.dtype_flag, self.upload_limit = device, dtype_flag, upload_limit

    def submit(self, values: dict) -> tuple[Job, Settings]:
        """Check the form and queue its generation; UserError for a bad form."""
        folder = self.results.new_folder()
        try:
            reader = FormReader(self.library, folder, self.upload_limit)
            settings = reader.read(values, self.dtype_flag)
            record = reader.record(values, settings)
            job = self.worker.submit(lambda job: self._generate(job, settings, folder, record))
        except BaseException:
            self.results.discard(folder)
            raise
        return job, settings

    def _generate(self, job: Job, settings: Settings, folder: Path, form: dict) -> Result:
        def status(text: str) -> None:
            job.phase = text

        job.passes = settings.freeinit_iterations + 1
        try:
            pipe = self.manager.pipeline(settings.model_spec(), status)
            job.phase = "denoising"
            video = pipe(**settings.pipeline_kwargs(), progress=False, callback=job.progress)
            job.phase = "saving"
            return self.results.save(folder, video, settings, pipe.sources, form)
        except BaseException:
            self.results.discard(folder)
            raise
