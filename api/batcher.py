"""Micro-batching: one worker thread owns the model; requests wait on a bounded queue.

A request puts a job (its prepared images and DecodeOptions) on the queue and
awaits a future. The worker takes the first job, gathers more for up to
`max_wait_ms` or until `max_batch_size` images, groups the jobs whose options are
identical into one `Predictor.caption_batch` call each, and resolves every
job's future on its event loop. A full queue is refused at once (`QueueFull`),
so an overloaded server answers 503 instead of queueing without bound.

Should the worker itself die (an error outside a model call), the jobs it held
and those queued fail with `WorkerDead`, and so does every later submit: a dead
worker is answered at once, never by a timeout. A lock makes "still accepting?"
and "queue the job" one step, and stopping flips it in the same lock, so no job
can slip into the queue behind the worker's stop mark and wait for nobody.
"""

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor, PreparedImage

from .metrics import Metrics

log = logging.getLogger("captioner.api")

_STOP = object()


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class WorkerDead(Exception):
    pass


@dataclass(eq=False)
class Job:
    images: list[PreparedImage]
    options: DecodeOptions
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def group(self):
        """Jobs with equal keys share a model call. Seeded sampling runs alone, so a seed
        gives the same captions whatever else is in the batch."""
        if self.options.method == "sample" and self.options.seed is not None:
            return id(self)
        return self.options


class Batcher:
    def __init__(
        self,
        predictor: Predictor,
        metrics: Metrics,
        max_wait_ms: float = 5.0,
        queue_size: int = 64,
        on_batch: Callable[[int, float], None] | None = None,
    ):
        self.predictor = predictor
        self.metrics = metrics
        self.on_batch = on_batch  # told (images, seconds) after each model call: the measured throughput
        self.max_batch_size = predictor.max_batch_size  # what one model call holds
        self.max_wait = max_wait_ms / 1000.0
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._thread = threading.Thread(target=self._run, name="captioner-model", daemon=True)
        self._lock = threading.Lock()  # held to change _accepting, and to check it and queue a job
        self._accepting = False
        self._death: BaseException | None = None  # what killed the worker, if anything did
        self._current: list[Job] = []  # the jobs the worker holds (gathered, not yet resolved)
        metrics.queue_depth.set_function(self._queue.qsize)

    @property
    def alive(self) -> bool:
        return self._accepting and self._thread.is_alive() and self._death is None

    @property
    def dead(self) -> bool:
        """The worker ended without being asked to: nothing will be captioned any more."""
        return self._death is not None or (
            self._accepting and self._thread.ident is not None and not self._thread.is_alive()
        )

    def start(self) -> None:
        with self._lock:
            self._accepting = True
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, finish the queued ones, then end the worker."""
        with self._lock:
            self._accepting = False  # from here on no job enters the queue: _STOP is the last
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):  # a stuck worker: the join below says so
                self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model worker did not stop within %.0f s", timeout)
        if not self._thread.is_alive():
            self._fail_queued(ShuttingDown())

    async def submit(self, images: list[PreparedImage], options: DecodeOptions) -> list[dict]:
        """One result per image, in order; raises QueueFull, ShuttingDown or WorkerDead at once."""
        loop = asyncio.get_running_loop()
        job = Job(images, options, loop.create_future(), loop)
        with self._lock:
            if self.dead:
                raise WorkerDead()
            if not self._accepting:
                raise ShuttingDown()
            try:
                self._queue.put_nowait(job)
            except queue.Full:
                raise QueueFull() from None
        return await job.future

    def _fail_queued(self, error: Exception) -> None:
        """Answer every job still queued with `error` (the worker will not take them)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                _resolve(job, error=error)

    # The worker thread: everything below runs there, and only there is the model used.

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the worker is gone: say so to everyone waiting, and to all who come
            log.critical("the model worker died; the server cannot caption any more", exc_info=e)
            with self._lock:
                self._death = e
            for job in self._current:
                _resolve(job, error=WorkerDead())
            self._fail_queued(WorkerDead())

    def _serve(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            jobs, stop = self._gather(first)
            self._process(jobs)
            self._current = []
            if stop:
                return

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and whatever else arrives within max_wait, up to max_batch_size images."""
        jobs, size = [first], len(first.images)
        self._current = jobs
        deadline = time.monotonic() + self.max_wait
        while size < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                job = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is _STOP:
                return jobs, True
            jobs.append(job)
            if not job.future.done():  # a job whose client has gone takes no room in the batch
                size += len(job.images)
        return jobs, False

    def _process(self, jobs: list[Job]) -> None:
        groups: dict[object, list[Job]] = {}
        for job in jobs:
            if job.future.done():  # a request that timed out or whose client went away is not computed
                self.metrics.abandoned.inc(len(job.images))
            else:
                groups.setdefault(job.group, []).append(job)
        for group in groups.values():
            images = [image for job in group for image in job.images]
            try:
                started = time.perf_counter()
                results = self.predictor.caption_batch(images, group[0].options)
                if self.on_batch:
                    self.on_batch(len(images), time.perf_counter() - started)
            except Exception as e:  # the model failing must fail these requests, not the worker
                log.exception("captioning a batch of %d images failed", len(images))
                for job in group:
                    _resolve(job, error=e)
                continue
            for start in range(0, len(images), self.max_batch_size):  # caption_batch's own chunks
                self.metrics.batch_size.observe(min(self.max_batch_size, len(images) - start))
            self.metrics.images.inc(len(images))
            start = 0
            for job in group:
                _resolve(job, result=results[start : start + len(job.images)])
                start += len(job.images)


def _resolve(job: Job, result=None, error: Exception | None = None) -> None:
    def settle():
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(settle)
