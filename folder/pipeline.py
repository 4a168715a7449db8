"""Captioning many files fast: workers caption whole batches side by side, and results come out in order.

A worker reads and decodes its batch's images, runs the encoder and the
decoding, writes the overlays and formats the output lines; the calling thread
writes every batch, in order, as soon as it is done, with at most `workers + 1`
batches submitted ahead, so memory stays bounded whatever the folder's size.

On a CPU under Linux the workers are forked processes of one torch thread each,
forked and handled as the server's are (runtime.workers: why, how, and what a
dead one means): as threads of one process, workers slow each other through
Python's lock (docs/performance.md). On a GPU, or where there is no safe
fork, the workers are threads. A worker process that dies stops the run with
`BatchLost`, naming the files it held: the journal holds every batch before
them, and the same command run again captions those files and the rest.
"""

import queue
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from PIL import Image

from captioner.decoding import DecodeOptions
from captioner.images import ImageError
from captioner.overlay import caption_sheet, caption_with_pictures, drop_attention
from captioner.predictor import Predictor
from runtime.files import replacing
from runtime.workers import ForkedWorker, ThreadWorker, Worker, WorkerDied, can_fork

from .files import SKIP_CODES, Entry
from .journal import result_line

OVERLAY_TILE = 224  # pixels per tile of an overlay sheet; pictures are kept no larger
MIN_TAIL_BATCH = 4  # the shortest batch near the end: smaller ones cost more per image than they save


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 8  # images per encoder and decoder call
    workers: int = 2  # batches captioned at once
    threads_per_worker: int = 1  # torch threads of each worker
    processes: bool = True  # workers as forked processes where that is safe and useful (see above)
    overlays: Path | None = None  # folder for one PNG sheet per image
    keep_attention: bool = True  # attention in the output lines (decoding may need it only for overlays)


class BatchLost(Exception):
    """A worker process died while it captioned `files`: the run stops there."""

    def __init__(self, why: str, files: list[str]):
        super().__init__(why)
        self.why, self.files = why, files


@dataclass
class Tally:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0

    def add(self, other: "Tally") -> None:
        self.captioned += other.captioned
        self.failed += other.failed
        self.skipped += other.skipped


def caption_entries(
    predictor: Predictor,
    entries: list[Entry],
    options: DecodeOptions,
    config: PipelineConfig,
    write: Callable[[list[str]], None],
    progress: Callable[[int], object] = lambda n: None,
) -> Tally:
    """One output line per entry, handed to `write` a batch at a time in entry order. A worker
    that dies raises BatchLost; nothing after the batch it held is written."""
    tally = Tally()
    workers = _Workers(_make_workers(predictor, options, config))
    in_flight: deque[tuple[list[Entry], Future]] = deque()

    def finish(segment: list[Entry], outcome: Future) -> None:
        try:
            lines, segment_tally = outcome.result()
        except WorkerDied as e:
            raise BatchLost(str(e), [entry.file for entry in segment]) from None
        write(lines)
        tally.add(segment_tally)
        progress(segment_tally.captioned + segment_tally.failed)  # images, not files skipped by design

    try:
        for segment in _segments(entries, config.batch_size, config.workers):
            in_flight.append((segment, workers.submit(segment)))
            if len(in_flight) > config.workers + 1:
                finish(*in_flight.popleft())
        while in_flight:
            finish(*in_flight.popleft())
    finally:
        workers.shutdown()
    return tally


def workers_are_processes(device: torch.device, config: PipelineConfig) -> bool:
    """Forked workers where runtime.workers.can_fork says they are safe and useful."""
    return config.processes and can_fork(device.type, config.workers)


def _make_workers(predictor: Predictor, options: DecodeOptions, config: PipelineConfig) -> list[Worker]:
    caption = partial(_caption_segment, predictor, options, config.overlays, config.keep_attention)
    if workers_are_processes(predictor.device, config):
        threads = config.threads_per_worker
        return [ForkedWorker(caption, f"captioner-worker-{i}", threads) for i in range(config.workers)]
    torch.set_num_threads(config.threads_per_worker)  # the process's, which its worker threads share
    return [ThreadWorker(caption, f"worker-{i}") for i in range(config.workers)]


class _Workers:
    """The run's workers, each captioning one segment at a time: submit() hands a segment to a
    thread here, which takes whichever worker is free."""

    def __init__(self, workers: list[Worker]):
        self._workers: list[Worker] = []
        self._free: queue.SimpleQueue[Worker] = queue.SimpleQueue()
        try:
            for worker in workers:
                worker.start()
                self._workers.append(worker)
                self._free.put(worker)
        except BaseException:
            self.shutdown()
            raise
        self._threads = ThreadPoolExecutor(len(workers), "worker")

    def submit(self, segment: list[Entry]) -> Future:
        return self._threads.submit(self._run, segment)

    def _run(self, segment: list[Entry]) -> tuple[list[str], "Tally"]:
        worker = self._free.get()
        try:
            return worker.call(segment)
        finally:
            self._free.put(worker)  # a dead one too: its next call fails at once

    def shutdown(self) -> None:
        """Drop the segments not begun, finish those under way, then stop the workers."""
        if hasattr(self, "_threads"):
            self._threads.shutdown(cancel_futures=True)
        for worker in self._workers:
            worker.stop(timeout=30)


def _segments(entries: list[Entry], batch_size: int, workers: int) -> Iterator[list[Entry]]:
    """Runs of entries holding `batch_size` images each (files skipped by design ride along),
    shorter near the end so that the workers finish together: a worker that took the last full
    batch would run on alone while the others wait (guided self-scheduling)."""
    remaining = sum(entry.skip is None for entry in entries)

    def next_size() -> int:
        return max(min(batch_size, -(-remaining // (2 * workers))), min(batch_size, MIN_TAIL_BATCH))

    segment, images, size = [], 0, next_size()
    for entry in entries:
        segment.append(entry)
        images += entry.skip is None
        if images == size:
            yield segment
            remaining -= images
            segment, images, size = [], 0, next_size()
    if segment:
        yield segment


def _caption_segment(
    predictor: Predictor, options: DecodeOptions, overlays: Path | None, keep_attention: bool, segment: list[Entry]
) -> tuple[list[str], Tally]:
    """In a worker: the output line of every entry, in order, and how they went."""
    readable = [entry for entry in segment if entry.skip is None]
    captioned = caption_with_pictures(
        predictor, [entry.path for entry in readable], options, OVERLAY_TILE if overlays else None
    )
    outcomes = dict(zip((entry.file for entry in readable), captioned))  # names are unique in a run
    tally, lines = Tally(), []
    for entry in segment:
        outcome = entry.skip or outcomes[entry.file]
        if isinstance(outcome, ImageError):
            result = _error(outcome)
            if outcome.code in SKIP_CODES:
                tally.skipped += 1
            else:
                tally.failed += 1
        else:
            result, picture = outcome
            tally.captioned += 1
            if overlays is not None and picture is not None:  # the sheet exists before its line says it is done
                _write_sheet(picture, result, overlays / f"{entry.file}.png")
            if not keep_attention:
                drop_attention(result)
        lines.append(result_line(entry.file, result))
    return lines, tally


def _error(e: ImageError) -> dict:
    return {"error": {"code": e.code, "message": e.message}}


def _write_sheet(picture: Image.Image, result: dict, path: Path) -> None:
    """Replaced whole (`replacing`): a full disk leaves no half-drawn sheet under its name, and its
    DiskFullError, naming the sheet, reaches the run from a forked worker too."""
    best = result["captions"][0]
    sheet = caption_sheet(picture, best["tokens"], best.get("attention", []), tile=OVERLAY_TILE)
    with replacing(path) as tmp:
        sheet.save(tmp, format="PNG", compress_level=1)  # fast: sheets are for looking at
