"""One worker thread per device: a bounded queue of jobs run one at a time on one pipeline.

A job is a function of the pipeline; its result or error comes back through a
``concurrent.futures.Future`` the HTTP handler awaits. The worker keeps the state the webui's
``/progress`` reports (job, batch, step) and each waiting job's queue position.
"""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from sdrt.runtime.errors import SdrtError


class QueueFull(SdrtError):
    """Every place in the queue is taken; ``retry_after`` estimates when one frees, in seconds."""

    def __init__(self, message: str, retry_after: int):
        super().__init__(message)
        self.retry_after = retry_after


@dataclass
class Job:
    label: str  # what /progress names as the state's job ("txt2img", "load <model>")
    run: Callable  # run(pipeline, job) -> the result the handler gets
    task_id: str
    future: Future = field(default_factory=Future)
    timestamp: str = field(default_factory=lambda: time.strftime("%Y%m%d%H%M%S"))
    started: float | None = None
    batch: int = 0
    batches: int = 0
    step: int = 0
    steps: int = 0
    interrupted: bool = False
    skipped: bool = False
    # The live preview: wanted by a /progress request, decoded by the worker at a step
    preview_wanted: bool = False
    preview: object = None  # PIL image
    preview_step: int = 0

    def on_step(self, event: dict) -> None:
        """The pipeline's per-step callback."""
        if event["batch"] != self.batch:
            self.preview_step = 0  # steps count from 1 again in each batch
        self.batch, self.batches = event["batch"], event["batches"]
        self.step, self.steps = event["step"], event["steps"]


class Worker:
    """Runs jobs in order on ``pipeline`` in its own thread; at most ``queue_size`` wait."""

    def __init__(self, pipeline, queue_size: int):
        if queue_size < 1:
            raise SdrtError(f"the queue size must be at least 1, got {queue_size}")
        self.pipeline = pipeline
        self.queue_size = queue_size
        self._waiting: list[Job] = []
        self._current: Job | None = None
        self._closing = False
        self._cond = threading.Condition()
        self._ids = itertools.count(1)
        self._seconds = 1.0  # a running mean of job durations, for Retry-After
        self._thread = threading.Thread(target=self._loop, name="sdrt-serve-worker", daemon=True)
        self._thread.start()

    def submit(self, label: str, run: Callable, task_id: str | None = None) -> Job:
        """Queue ``run``; QueueFull (with a Retry-After estimate) when the queue is full."""
        with self._cond:
            if self._closing:
                raise QueueFull("the server is shutting down", 5)
            if len(self._waiting) >= self.queue_size:
                ahead = len(self._waiting) + (self._current is not None)
                raise QueueFull(f"the queue is full ({self.queue_size} jobs waiting)",
                                max(1, round(ahead * self._seconds)))
            job = Job(label, run, task_id or f"task({next(self._ids)})")
            self._waiting.append(job)
            self._cond.notify()
            return job

    def _loop(self) -> None:
        while True:
            with self._cond:
                while not self._waiting and not self._closing:
                    self._cond.wait()
                if not self._waiting:
                    return
                job = self._waiting.pop(0)
                if not job.future.set_running_or_notify_cancel():
                    continue  # its client went away while it waited
                job.started = time.monotonic()
                self._current = job
            result, error = None, None
            try:
                result = job.run(self.pipeline, job)
            except BaseException as e:  # noqa: BLE001 - every job ends with its result or its error
                error = e
            with self._cond:  # idle before the client hears back, so its next /progress says so
                self._seconds = 0.8 * self._seconds + 0.2 * (time.monotonic() - job.started)
                self._current = None
            if error is not None:
                job.future.set_exception(error)
            else:
                job.future.set_result(result)

    def state(self) -> tuple[Job | None, int]:
        """(the running job or None, how many wait)."""
        with self._cond:
            return self._current, len(self._waiting)

    def position(self, task_id: str) -> int | None:
        """0: running; n: n-th in the queue; None: not known (finished, or never queued)."""
        with self._cond:
            if self._current is not None and self._current.task_id == task_id:
                return 0
            for i, job in enumerate(self._waiting):
                if job.task_id == task_id:
                    return i + 1
        return None

    def cancel(self, job: Job) -> None:
        """Drop ``job`` if it waits, or stop it at its next step if it runs (its client went away)."""
        with self._cond:
            if job in self._waiting:
                self._waiting.remove(job)
                job.future.cancel()
            elif job is self._current:
                job.interrupted = True
                self.pipeline.interrupt()

    def interrupt(self) -> None:
        """Stop the running job at its next step (the webui's Interrupt); nothing when idle."""
        with self._cond:
            if self._current is not None:
                self._current.interrupted = True
                self.pipeline.interrupt()

    def skip(self) -> None:
        """Go on with the running job's next batch at the next step (the webui's Skip)."""
        with self._cond:
            if self._current is not None:
                self._current.skipped = True
                self.pipeline.skip()

    def close(self, timeout: float | None = None) -> None:
        """Accept nothing more, finish the jobs accepted, then stop the thread."""
        with self._cond:
            self._closing = True
            self._cond.notify()
        self._thread.join(timeout)
