"""One generation at a time per device: a FIFO queue served by one worker thread.

A job reports its state (queued with its place in the line, running with step and ETA, done,
failed, cancelled). Cancelling a queued job drops it; cancelling a running one makes the
pipeline's step callback raise, which stops the generation after the current step.
"""

from __future__ import annotations

import collections
import logging
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
FINISHED = (DONE, FAILED, CANCELLED)


class Cancelled(Exception):
    """Raised from the step callback to stop a generation."""


class UserError(ValueError):
    """A mistake in what was asked: its message is shown as it is."""


@dataclass
class Job:
    """A unit of work; `run(job)` does it and returns its result."""

    run: Callable[[Job], object]
    id: str = field(default_factory=lambda: secrets.token_urlsafe(12))
    state: str = QUEUED
    phase: str = "waiting"  # what a running job is doing: loading, denoising, saving
    step: int = 0
    total: int = 0  # steps of one denoising pass
    passes: int = 1  # FreeInit denoises the video several times
    pass_index: int = 0
    started: float | None = None  # when denoising began (for the ETA)
    message: str = ""
    result: object = None
    cancel_requested: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)

    def progress(self, done: int, total: int) -> None:
        """The pipeline's step callback: record, and stop if cancelled."""
        if self.started is None:
            self.started = time.monotonic()
        if done < self.step:  # the step count started again: the next pass
            self.pass_index += 1
        self.phase, self.step, self.total = "denoising", done, total
        if self.cancel_requested.is_set():
            raise Cancelled()

    def eta(self) -> float | None:
        """Seconds left, from the mean time per step so far (over every pass)."""
        done = self.pass_index * self.total + self.step
        if self.started is None or done == 0 or self.total == 0:
            return None
        per_step = (time.monotonic() - self.started) / done
        return per_step * (max(self.passes, self.pass_index + 1) * self.total - done)


class Worker:
    """Runs submitted jobs one after another on a daemon thread."""

    def __init__(self, max_queue: int = 32):
        self.max_queue = max_queue
        self._queue: collections.deque[Job] = collections.deque()
        self._lock = threading.Condition()
        self.current: Job | None = None
        self._thread = threading.Thread(target=self._loop, name="animatediff-worker", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Job], object]) -> Job:
        with self._lock:
            if len(self._queue) >= self.max_queue:
                raise UserError(f"the queue is full ({self.max_queue} waiting); try again later")
            job = Job(run)
            self._queue.append(job)
            self._lock.notify()
        return job

    def ahead(self, job: Job) -> int:
        """How many jobs run before this queued one (the running one included)."""
        with self._lock:
            if job not in self._queue:
                return 0
            return self._queue.index(job) + (self.current is not None)

    def cancel(self, job: Job) -> None:
        with self._lock:
            if job in self._queue:
                self._queue.remove(job)
                self._finish(job, CANCELLED, "cancelled before it started")
                return
        job.cancel_requested.set()

    def _loop(self) -> None:
        while True:
            with self._lock:
                while not self._queue:
                    self._lock.wait()
                job = self.current = self._queue.popleft()
                job.state, job.phase = RUNNING, "starting"
            self._execute(job)
            with self._lock:
                self.current = None

    def _execute(self, job: Job) -> None:
        try:
            job.result = job.run(job)
        except Cancelled:
            self._finish(job, CANCELLED, f"cancelled at step {job.step} of {job.total}")
        except (ValueError, FileNotFoundError) as e:  # the library's word for a bad request
            log.warning("generation failed: %s", _one_line(e))
            self._finish(job, FAILED, _one_line(e))
        except Exception as e:  # shown as one line; the traceback goes to the server's log
            log.exception("generation failed")
            self._finish(job, FAILED, _one_line(e))
        else:
            self._finish(job, DONE, "")

    @staticmethod
    def _finish(job: Job, state: str, message: str) -> None:
        job.state, job.message = state, message
        job.finished.set()


def _one_line(error: Exception) -> str:
    """A library error's message as the page shows it (never a traceback)."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= 400 else text[:397] + "..."
