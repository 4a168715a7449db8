"""Micro-batching: requests wait on a bounded queue; batches go to whichever model worker is free.

A request puts a job (its uploads and options) on the queue and awaits a future. The
dispatcher thread waits for a free worker (api.workers) first, then takes the first job and
gathers more for up to `max_wait_ms` (`busy_wait_ms` while another worker is busy) or until
`max_batch_size` images: while every worker is busy, requests pile up into the next batch, so
batches grow with the load, and a lone request on an idle server goes at once. Jobs whose options
are identical share a batch. Of the free workers, the one freed last takes the batch, so under
light load one worker does all the work with its caches warm; and a batch handed over while
every other worker is idle, and has been for a second, may use all the cores (api.workers).
Each worker has a thread here that minds it: it hands the worker its batch, frees the worker,
then resolves every job's future on its event loop. Freed first, so the pool's state is true
whenever a client sees its answer: a client that sends again at once finds its worker free (not
counted busy, which would hold its request for more, nor passed over for a colder one). A full
queue is refused at once (`QueueFull`), so an overloaded server answers 503 instead of queueing
without bound.

A worker that dies is replaced by its minder: the jobs of the batch it held fail with
`WorkerLost` (captioning has no side effects, so the client may simply retry), the worker is
forked again (api.workers) and goes back in the pool; every other job is unaffected. A worker
process that dies while idle is reported by the thread that forked it, and replaced at once; one
found dead as it is handed a batch is replaced before it runs it. Deaths are counted against a
`RestartBudget`: beyond it, or should the dispatcher itself fail (an error outside a model call),
the batcher gives up: the jobs held and queued fail with `WorkerDead`, and so does every later
submit, and `on_give_up` is called so that the server exits and whatever supervises it starts it
afresh. A lock makes "still accepting?" and "queue the job" one step, and stopping flips it in
the same lock, so no job can slip into the queue behind the dispatcher's stop mark and wait for
nobody. A batch whose answering fails (a metric, the `on_batch` callback) fails its requests and
is logged; its minder goes on.
"""

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from captioner.decoding import DecodeOptions
from runtime.children import RestartBudget
from runtime.workers import WorkerDied

from .metrics import Metrics
from .workers import Batch, Outcome, ProcessWorker, ThreadWorker

log = logging.getLogger("captioner.api")

_STOP = object()
QUIET_S = 1.0  # how long no two batches overlapped before a lone batch may use every core

Worker = ThreadWorker | ProcessWorker
Idle = tuple[float, int]  # on the idle queue: (minus when it was freed, the worker's index), the last freed first
_DEATH: Idle = (-math.inf, -1)  # on the idle queue: the batcher gave up; first out, so a waiting dispatcher wakes
_CHECK = object()  # in a minder's inbox: its worker may have died, to be replaced before anything else


class QueueFull(Exception):
    pass


class ShuttingDown(Exception):
    pass


class WorkerLost(Exception):
    """The worker died while it held this job's batch: a retry goes to its replacement."""


class WorkerDead(Exception):
    """The batcher has given up (workers dying beyond the restart budget, or the dispatcher
    failed): the server is exiting."""


@dataclass(eq=False)
class Job:
    uploads: list[bytes]
    names: list[str]
    options: DecodeOptions
    overlay_size: int | None
    keep_attention: bool
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop

    @property
    def group(self):
        """Jobs with equal keys share a batch. Seeded sampling runs alone, so a seed gives the
        same captions whatever else is in the batch."""
        if self.options.method == "sample" and self.options.seed is not None:
            return id(self)
        return self.options, self.overlay_size, self.keep_attention


class Batcher:
    def __init__(
        self,
        workers: Sequence[Worker],
        metrics: Metrics,
        max_batch_size: int,
        max_wait_ms: float = 0.0,
        queue_size: int = 64,
        busy_wait_ms: float = 5.0,
        on_batch: Callable[[int, float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        restarts: RestartBudget | None = None,
        on_give_up: Callable[[str], None] | None = None,
    ):
        self.workers = list(workers)
        self.metrics = metrics
        self.on_batch = on_batch  # told (images, seconds per image the server takes) after each batch
        self.restarts = restarts or RestartBudget(5, 60.0)  # how many worker deaths it survives
        self.on_give_up = on_give_up  # told why, once, when it gives up
        self.max_batch_size = max_batch_size
        self.max_wait = max_wait_ms / 1000.0
        self.busy_wait = max(max_wait_ms, busy_wait_ms) / 1000.0  # while another worker is busy
        self.clock = clock  # the lone-batch rule's quiet second is on it (a test's fake one); waits are real
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._idle: queue.PriorityQueue[Idle] = queue.PriorityQueue()
        self._freed = itertools.count()  # numbers each freeing: the idle queue gives the worker freed last
        self._busy: set[int] = set()  # the workers running a batch, by index
        self._pool_lock = threading.Lock()  # held to move a worker between busy and idle
        self._inboxes: list[queue.Queue] = [queue.Queue() for _ in self.workers]
        self._minders = [
            threading.Thread(target=self._mind, args=(i, box), name=f"captioner-minder-{i}", daemon=True)
            for i, box in enumerate(self._inboxes)
        ]
        self._thread = threading.Thread(target=self._run, name="captioner-dispatcher", daemon=True)
        self._lock = threading.Lock()  # held to change _accepting and gave_up, and to check them and queue a job
        self._accepting = False
        self.gave_up: str | None = None  # why the batcher gave up, if it did
        self._current: list[Job] = []  # the jobs the dispatcher holds (gathered, not yet handed over)
        self._crowded_at = -math.inf  # when a batch was last handed over while another worker was busy
        metrics.queue_depth.set_function(self._queue.qsize)
        metrics.workers_alive.set_function(lambda: self.workers_alive)

    @property
    def alive(self) -> bool:
        """Ready for work: accepting, and at least one worker can take it."""
        return self._accepting and self._thread.is_alive() and not self.dead and self.workers_alive > 0

    @property
    def dead(self) -> bool:
        """The batcher gave up, or its dispatcher ended without being asked to: nothing will be
        captioned any more (a dead worker is not this: it is replaced)."""
        if self.gave_up is not None:
            return True
        started = self._accepting and self._thread.ident is not None
        return started and not self._thread.is_alive()

    @property
    def workers_alive(self) -> int:
        return sum(worker.alive for worker in self.workers)

    def start(self) -> None:
        """Start dispatching, once the workers are ready."""
        with self._lock:
            self._accepting = True
        for index, (worker, minder) in enumerate(zip(self.workers, self._minders)):
            if isinstance(worker, ProcessWorker):
                worker.on_end = functools.partial(self._ended, index)
            minder.start()
            self._free(index)
            self._inboxes[index].put(_CHECK)  # one that died before its end was watched for
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Refuse new jobs, finish the queued ones, then end the dispatcher and the workers."""
        with self._lock:
            self._accepting = False  # from here on no job enters the queue: _STOP is the last
        if self._thread.is_alive():
            with contextlib.suppress(queue.Full):  # a stuck dispatcher: the join below says so
                self._queue.put(_STOP, timeout=timeout)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("the model dispatcher did not stop within %.0f s", timeout)
        for box in self._inboxes:
            box.put(None)  # after whatever batch a minder still has
        for minder in self._minders:
            if minder.is_alive():
                minder.join(timeout)
        for worker in self.workers:
            worker.stop(timeout)
        if not self._thread.is_alive():
            self._fail_queued(ShuttingDown())

    async def submit(
        self,
        uploads: list[bytes],
        names: list[str],
        options: DecodeOptions,
        overlay_size: int | None = None,
        keep_attention: bool = True,
    ) -> list[Outcome]:
        """One outcome per upload, in order; raises QueueFull, ShuttingDown or WorkerDead at once."""
        loop = asyncio.get_running_loop()
        job = Job(uploads, names, options, overlay_size, keep_attention, loop.create_future(), loop)
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
        """Answer every job still queued with `error` (no worker will take them)."""
        while True:
            try:
                job = self._queue.get_nowait()
            except queue.Empty:
                return
            if job is not _STOP:
                _resolve(job, error=error)

    def _give_up(self, why: str, jobs: list[Job]) -> None:
        """Nothing more will be captioned: the jobs held, those queued and every later one fail
        with WorkerDead, and on_give_up is told why (the server exits on it)."""
        with self._lock:
            first = self.gave_up is None
            self.gave_up = self.gave_up or why
        _fail(jobs, WorkerDead())
        self._fail_queued(WorkerDead())
        self._idle.put(_DEATH)  # wakes the dispatcher if it waits for a worker
        if not first:
            return
        log.critical("%s: giving up, so that whatever supervises the server starts it afresh", why)
        if self.on_give_up is not None:
            try:
                self.on_give_up(why)
            except Exception:
                log.exception("telling the server that the model workers gave up failed")

    def _ended(self, index: int) -> None:
        """Told by a worker's fork thread that its process ended: while the server accepts work,
        its minder replaces it, idle or busy (a busy one's minder sees it first, and this is then
        a no-op)."""
        with self._lock:
            accepting = self._accepting
        if accepting:
            self._inboxes[index].put(_CHECK)

    # The dispatcher thread: gathers jobs into batches and hands them to free workers.

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as e:  # the dispatcher is gone: say so to everyone waiting, and to all who come
            log.critical("the model dispatcher failed", exc_info=e)
            self._give_up(f"the model dispatcher failed: {type(e).__name__}: {e}", self._current)

    def _serve(self) -> None:
        while True:
            held = self._idle.get()  # while all are busy, jobs wait in the queue and make bigger batches
            if held == _DEATH:
                return
            first = self._queue.get()
            if first is _STOP:
                return
            held = self._warmest(held)
            jobs, stop = self._gather(first)
            self._hand_over(jobs, held)
            self._current = []
            if stop:
                return

    def _warmest(self, held: Idle) -> Idle:
        """`held`, or the worker freed last if one was freed while `held` waited for a job: under
        light load one worker takes every batch, its caches warm, instead of the workers taking
        turns. (A worker freed before `held` may be idle too: the queue's order tells them apart.)"""
        try:
            top = self._idle.get_nowait()  # of the idle workers, the one freed last
        except queue.Empty:
            return held
        if top == _DEATH or top > held:  # a death is left for the dispatcher's next wait to see
            self._idle.put(top)
            return held
        self._idle.put(held)
        return top

    def _gather(self, first: Job) -> tuple[list[Job], bool]:
        """`first` and whatever else arrives within max_wait (busy_wait while another worker is
        busy), up to max_batch_size images. Under load a worker frees as the clients it answered
        send their next requests: without the wait, most of its batches would be of one image."""
        jobs, size = [first], len(first.uploads)
        self._current = jobs
        deadline = time.monotonic() + (self.busy_wait if self._another_busy() else self.max_wait)
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
                size += len(job.uploads)
        return jobs, False

    def _hand_over(self, jobs: list[Job], held: Idle) -> None:
        """Each group of jobs to a worker: the first to `held`, the others to the next free ones."""
        groups: dict[object, list[Job]] = {}
        for job in jobs:
            if job.future.done():  # a request that timed out or whose client went away is not computed
                self._count_abandoned(len(job.uploads))
            else:
                groups.setdefault(job.group, []).append(job)
        if not groups:
            self._idle.put(held)
            return
        free: Idle | None = held
        for group in groups.values():
            free = free or self._idle.get()
            if free == _DEATH:  # given up: _give_up has answered the rest; left for the next wait
                self._idle.put(_DEATH)
                _fail(group, WorkerDead())
            else:
                alone = self._alone()
                index = free[1]
                with self._pool_lock:
                    self._busy.add(index)
                self._inboxes[index].put((_batch(group), group, alone))
            free = None

    def _count_abandoned(self, images: int) -> None:
        """A metric, counted so that its failure is logged and the dispatcher goes on."""
        try:
            self.metrics.abandoned.inc(images)
        except Exception:
            log.exception("counting %d abandoned images failed", images)

    def _alone(self) -> bool:
        """Whether the batch being handed over may use every core: no other worker is busy, and
        none was at a hand-over for QUIET_S. Under load a worker often frees while the next
        requests are still being read; its batch must not take the cores the others need."""
        now = self.clock()
        if self._another_busy():
            self._crowded_at = now
        return now - self._crowded_at > QUIET_S

    def _another_busy(self) -> bool:
        """Whether a worker is running a batch (the one being handed a batch is not yet counted)."""
        with self._pool_lock:
            return bool(self._busy)

    def _free(self, index: int, only_if_busy: bool = False) -> None:
        """Worker `index` back in the pool: no longer busy, and the first the dispatcher takes.
        `only_if_busy`: not if it was freed already (twice in the pool, it would be handed two
        batches at once)."""
        with self._pool_lock:
            if only_if_busy and index not in self._busy:
                return
            self._busy.discard(index)
            self._idle.put((-next(self._freed), index))

    # A minder thread per worker: runs its batches, answers their jobs, replaces the worker.

    def _mind(self, index: int, inbox: queue.Queue) -> None:
        """Runs the batches handed to worker `index` until told to stop (None), replacing the
        worker first whenever it has died. An error of its own fails the jobs involved and is
        logged; it goes on. After the batcher gives up it fails whatever it is handed."""
        while (item := inbox.get()) is not None:
            try:
                self._handle(index, item)
            except Exception as e:
                log.exception("minding model worker %d failed", index)
                if item is not _CHECK:
                    _fail(item[1], e)
                    self._free(index, only_if_busy=True)

    def _handle(self, index: int, item) -> None:
        """`item`: _CHECK, or a batch with its jobs."""
        if not self._worker_ready(index):
            if item is not _CHECK:
                _fail(item[1], WorkerDead())
            return
        if item is not _CHECK:
            self._run_batch(index, *item)

    def _worker_ready(self, index: int) -> bool:
        """Worker `index` alive, replaced if it had died; False once the batcher has given up."""
        if self.gave_up is not None:
            return False
        worker = self.workers[index]
        return worker.alive or self._replace(index, worker.death())

    def _replace(self, index: int, why: str) -> bool:
        """Worker `index` started again, if the restart budget allows (a start that fails counts
        as another death); False when it does not, and the batcher has given up."""
        while self.gave_up is None:
            if not self.restarts.allow():
                budget = self.restarts.describe()
                self._give_up(f"{why}; model workers died {budget} (max_worker_restarts, restart_window_s)", [])
                return False
            log.error("%s; starting a new one", why)
            try:
                self.workers[index].restart()
            except Exception as e:
                why = f"model worker {index} could not be started again: {type(e).__name__}: {e}"
                continue
            self.metrics.worker_restarts.inc()
            return True
        return False

    def _run_batch(self, index: int, batch: Batch, jobs: list[Job], alone: bool) -> None:
        """The batch through the worker, the worker freed, then its jobs answered (or failed)."""
        started = time.perf_counter()
        try:
            outcomes = self.workers[index].run(batch, alone)
        except WorkerDied as e:
            self._lost(index, jobs, str(e))
            return
        except Exception as e:  # the model failing must fail these requests, not the worker
            self._free(index)
            log.exception("captioning a batch of %d images failed", len(batch.uploads))
            _fail(jobs, e)
            return
        except BaseException as e:  # what `except Exception` misses ends a model call in a thread
            log.error("a model call ended by %r", e, exc_info=e)
            self._lost(index, jobs, f"{self.workers[index].death()}: {type(e).__name__}: {e}")
            return
        seconds = time.perf_counter() - started
        self._free(index)  # before the answers: see the module's docstring
        try:
            self._answer(jobs, outcomes, seconds)
        except Exception as e:  # a metric or the callback: these requests fail, the minder goes on
            log.exception("answering a batch of %d images failed", len(batch.uploads))
            _fail(jobs, e)  # a job already answered keeps its answer

    def _lost(self, index: int, jobs: list[Job], why: str) -> None:
        """Worker `index` died holding these jobs: they fail (to be retried), and the worker is
        replaced and back in the pool."""
        _fail(jobs, WorkerLost(why))
        if self._replace(index, why):
            self._free(index)

    def _answer(self, jobs: list[Job], outcomes: list[Outcome], seconds: float) -> None:
        if self.on_batch:
            self.on_batch(len(outcomes), seconds / len(self.workers))  # the workers run side by side
        captioned = sum(isinstance(outcome, bytes) for outcome in outcomes)  # unreadable ones never reach the model
        for start in range(0, captioned, self.max_batch_size):  # caption_batch's own chunks
            self.metrics.batch_size.observe(min(self.max_batch_size, captioned - start))
        self.metrics.images.inc(captioned)
        start = 0
        for job in jobs:
            _resolve(job, result=outcomes[start : start + len(job.uploads)])
            start += len(job.uploads)


def _batch(group: list[Job]) -> Batch:
    first = group[0]
    return Batch(
        uploads=[data for job in group for data in job.uploads],
        names=[name for job in group for name in job.names],
        options=first.options,
        keep_attention=first.keep_attention,
        overlay_size=first.overlay_size,
    )


def _fail(jobs: list[Job], error: BaseException) -> None:
    for job in jobs:
        _resolve(job, error=error)


def _resolve(job: Job, result=None, error: BaseException | None = None) -> None:
    def settle():
        if job.future.done():
            return
        if error is not None:
            job.future.set_exception(error)
        else:
            job.future.set_result(result)

    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
        job.loop.call_soon_threadsafe(settle)
