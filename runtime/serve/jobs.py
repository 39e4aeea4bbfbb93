"""The request queue and the worker that owns the engines.

A Pipeline reuses its device buffers, so exactly one thread (the worker) ever calls it. Requests
become jobs of rows (one row = one image: prompt, negative prompt, seed). Rows of jobs that share
an engine call (the same GenerationConfig.batch_key: size, steps, sampler, guidance, ...) are batched, up to the engines' max batch,
within a short window after the first arrives. Each step, rows whose client went away or whose
deadline passed are dropped from the batch (Pipeline.generate's callback).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from sdrt.errors import SdrtError
from sdrt.loop import STOP, Cancelled
from sdrt.pipeline import Pipeline
from sdrt.request import GenerationConfig


class QueueFull(SdrtError):
    """The bounded queue has no room: answered 429 with Retry-After."""


RUNNING_GRACE_S = 4.0  # after the drain, the running batch's time to finish (serve gives uvicorn 1 s more)


class ShuttingDown(SdrtError):
    """The server is stopping or not ready: answered 503."""


class RequestTimeout(SdrtError):
    """The request's deadline passed before its images were done: answered 504."""


class ClientGone(SdrtError):
    """The client disconnected; nobody reads this."""


@dataclass
class Image:
    array: np.ndarray  # (H, W, 3) uint8
    seed: int
    parameters: str  # A1111 infotext


@dataclass(eq=False)  # identity: a job is itself, whatever its fields
class Job:
    config: GenerationConfig  # validated; its rows are this job's images
    deadline: float
    future: Future = field(default_factory=Future)
    created: float = field(default_factory=time.monotonic)
    cancelled: bool = False
    next_row: int = 0  # rows handed to the worker so far
    images: dict[int, Image] = field(default_factory=dict)

    @property
    def key(self) -> tuple[Any, ...]:
        """What rows must share to run in one engine call (GenerationConfig.batch_key)."""
        return self.config.batch_key

    @property
    def rows(self) -> int:
        return self.config.batch

    @property
    def pending(self) -> int:
        """Rows not yet handed to the worker."""
        return self.rows - self.next_row

    def wanted(self, now: float) -> bool:
        """Still connected and within its deadline."""
        return not self.cancelled and now <= self.deadline

    def cancel(self) -> None:
        self.cancelled = True

    def fail(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)


@dataclass
class Progress:
    """What /sdapi/v1/progress reports."""

    step: int = 0
    steps: int = 0
    started: float = 0.0
    running: bool = False
    stop: str | None = None  # "interrupt" or "skip": the running batch ends after its current step


class Scheduler:
    """One worker thread per engine set, fed by a bounded queue of rows."""

    def __init__(self, load: Callable[[], Pipeline], max_queue: int, max_batch: int | None, window_s: float,
                 observe: Callable[[str, Any], None] = lambda kind, value: None):
        self._load = load
        self.max_queue = max_queue
        self._max_batch = max_batch
        self.window_s = window_s
        self.observe = observe  # metrics hook: ("batch", rows), ("timings", Timings), ("images", n)
        self.pipeline: Pipeline | None = None
        self.ready = threading.Event()
        self.load_error: BaseException | None = None
        self.progress = Progress()
        self._queue: deque[Job] = deque()
        self._running: list[Job] = []  # the jobs of the batch in the engines
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="sdrt-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The worker thread runs (after a failed load or close() it has ended)."""
        return self._thread.is_alive()

    def wait_loaded(self) -> None:
        """Until the engines are loaded (ready) or failed to (load_error: the worker has ended)."""
        while not self.ready.wait(0.1) and self._thread.is_alive():
            pass

    @property
    def max_batch(self) -> int:
        assert self.pipeline is not None
        top = self.pipeline.limits.batch[2]
        return max(1, min(self._max_batch or top, top))

    @property
    def queued_rows(self) -> int:
        with self._cond:  # re-entrant: also called with the lock held
            return sum(job.pending for job in self._queue)

    @property
    def queued_jobs(self) -> int:
        with self._cond:
            return len(self._queue)

    def submit(self, job: Job) -> Future:
        with self._cond:
            if self._closed or not self.ready.is_set():
                raise ShuttingDown("the server is shutting down" if self._closed else "engines are still loading")
            queued = self.queued_rows
            if queued + job.rows > self.max_queue:
                raise QueueFull(f"the queue holds {queued} of {self.max_queue} images; retry shortly")
            self._queue.append(job)
            self._cond.notify_all()
        return job.future

    def stop_running(self, kind: str) -> bool:
        """A1111's interrupt and skip: the batch in the engines ends after its current step and its
        images are decoded as they are. "interrupt" also ends its requests there (they get the
        images made so far); "skip" lets their later rows (n_iter batches) run. False: none running."""
        with self._cond:
            if not self.progress.running:
                return False
            self.progress.stop = kind
            return True

    # --- shutdown ---------------------------------------------------------------------------

    def begin_close(self, drain_s: float, running_s: float = RUNNING_GRACE_S) -> None:
        """Takes no new work (503); queued work gets drain_s to finish, then is failed with a 503; the
        batch still in the engines then gets running_s more to finish, then its requests get a 503
        (and it stops before its next step), within the HTTP server's own grace period."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        for delay, action in ((drain_s, self._reject_queued), (drain_s + running_s, self._stop_running)):
            timer = threading.Timer(delay, action)
            timer.daemon = True
            timer.start()

    def _reject_queued(self) -> None:
        with self._cond:
            left = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        for job in left:
            job.fail(ShuttingDown("the server stopped before this request ran; retry on another instance"))

    def _stop_running(self) -> None:
        with self._cond:
            running = list(self._running)
        for job in running:
            job.fail(ShuttingDown("the server stopped while this request ran; retry on another instance"))
            job.cancel()

    def close(self, drain_s: float) -> None:
        """begin_close, then waits for the worker to finish the running batch and the queue."""
        self.begin_close(drain_s)
        if self._thread.is_alive():
            self._thread.join(timeout=drain_s + 60.0)
        self._reject_queued()

    # --- the worker ---------------------------------------------------------------------------

    def _run(self) -> None:
        try:
            self.pipeline = self._load()
            self.ready.set()
        except BaseException as e:  # reported by /ready and by every request
            self.load_error = e
            return
        while True:
            batch = self._take_batch()
            if batch is None:
                return
            self._generate(batch)

    def _take_batch(self) -> list[tuple[Job, list[int]]] | None:
        """Waits for work; then rows of jobs with the head job's key, up to max_batch."""
        with self._cond:
            while not self._queue:
                if self._closed:
                    return None
                self._cond.wait()
            head = self._queue[0]
            assert self.pipeline is not None
            most = min(self.max_batch, self.pipeline.engine_batch(head.config))  # SLG: 3 step rows per image
            window_end = head.created + self.window_s
            while time.monotonic() < window_end and sum(
                    j.pending for j in self._queue if j.key == head.key) < most:
                self._cond.wait(timeout=window_end - time.monotonic())
            batch: list[tuple[Job, list[int]]] = []
            room = most
            for job in list(self._queue):
                if job.key != head.key or room == 0:
                    continue
                if not job.wanted(time.monotonic()):
                    self._queue.remove(job)
                    self._finish_dropped(job)
                    continue
                take = list(range(job.next_row, min(job.rows, job.next_row + room)))
                job.next_row += len(take)
                room -= len(take)
                batch.append((job, take))
                if job.next_row == job.rows:
                    self._queue.remove(job)
            self._cond.notify_all()
            return batch

    def _finish_dropped(self, job: Job) -> None:
        if job.cancelled:
            job.fail(ClientGone("client disconnected"))
        else:
            job.fail(RequestTimeout("the request timed out before its images were done; raise --timeout "
                                    "or lower steps/size"))

    def _generate(self, batch: list[tuple[Job, list[int]]]) -> None:
        assert self.pipeline is not None
        pipe = self.pipeline
        rows = [(job, r) for job, taken in batch for r in taken]
        if not rows:
            return
        config = GenerationConfig.of_rows([(job.config, r) for job, r in rows])
        with self._cond:
            self._running = [job for job, _ in batch]
            self.progress = Progress(0, 0, time.monotonic(), True)
        self.observe("batch", len(rows))

        def step_done(done: int, total: int) -> Any:
            self.progress.step, self.progress.steps = done, total
            if self.progress.stop is not None:
                return STOP
            now = time.monotonic()
            keep = [i for i, (job, _) in enumerate(rows) if job.wanted(now)]
            return None if len(keep) == len(rows) else keep

        try:
            result = pipe.generate(config, callback=step_done)
        except Cancelled:
            result = None
        except BaseException as e:  # an engine failure fails this batch's requests, not the server
            for job, _ in batch:
                job.fail(e)
            return
        finally:
            with self._cond:
                self.progress.running = False
                self._running = []
                interrupted = self.progress.stop == "interrupt"
        if result is not None:
            self.observe("timings", result.timings)
            self.observe("images", len(result.rows))
            for index, row in enumerate(result.rows):
                job, r = rows[row]
                job.images[r] = Image(result.images[index], result.seeds[index], result.parameters(index))
        for job, taken in batch:
            if any(r not in job.images for r in taken):  # dropped from this batch
                self._finish_dropped(job)
            elif interrupted and not job.future.done():  # its later rows are not made
                with self._cond:
                    if job in self._queue:
                        self._queue.remove(job)
                job.future.set_result([job.images[r] for r in sorted(job.images)])
            elif len(job.images) == job.rows and not job.future.done():
                job.future.set_result([job.images[r] for r in range(job.rows)])


__all__ = ["ClientGone", "Image", "Job", "Progress", "QueueFull", "RequestTimeout", "Scheduler",
           "ShuttingDown"]
