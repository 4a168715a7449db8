"""Captioning many files fast: lanes caption whole batches side by side, and results come out in order.

A lane reads and decodes its batch's images, runs the encoder and the
decoding, writes the overlays and formats the output lines; the calling thread
writes every batch, in order, as soon as it is done, with at most `lanes + 1`
batches submitted ahead, so memory stays bounded whatever the folder's size.

On a CPU under Linux the lanes are forked processes of one torch thread each.
Decoding is thousands of small operators a second, and every one of them hands
Python's lock over: lanes that were threads of one process slowed each other
by a tenth (measured: README, "Benchmarks"). Forked lanes share the model's
weights with the parent and start in milliseconds. On a GPU, or where there is
no safe fork, the lanes are threads.
"""

import multiprocessing
import os
import signal
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from captioner.decoding import DecodeOptions
from captioner.images import ImageError
from captioner.overlay import caption_sheet, drop_attention, prepare_with_picture
from captioner.predictor import Predictor
from runtime.children import die_with_parent
from runtime.files import replacing

from .files import SKIP_CODES, Entry
from .journal import result_line

OVERLAY_TILE = 224  # pixels per tile of an overlay sheet; pictures are kept no larger
MIN_TAIL_BATCH = 4  # the shortest batch near the end: smaller ones cost more per image than they save


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 8  # images per encoder and decoder call
    lanes: int = 2  # batches captioned at once
    threads_per_lane: int = 1  # torch threads of each lane
    processes: bool = True  # lanes as forked processes where that is safe and useful (see above)
    overlays: Path | None = None  # folder for one PNG sheet per image
    keep_attention: bool = True  # attention in the output lines (decoding may need it only for overlays)


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
    """One output line per entry, handed to `write` a batch at a time in entry order."""
    tally = Tally()
    lanes = _start_lanes(predictor, config)
    in_flight: deque[Future] = deque()

    def finish(outcome: Future) -> None:
        lines, segment_tally = outcome.result()
        write(lines)
        tally.add(segment_tally)
        progress(segment_tally.captioned + segment_tally.failed)  # images, not files skipped by design

    try:
        for segment in _segments(entries, config.batch_size, config.lanes):
            in_flight.append(lanes.submit(_caption_segment, segment, options, config.overlays, config.keep_attention))
            if len(in_flight) > config.lanes + 1:
                finish(in_flight.popleft())
        while in_flight:
            finish(in_flight.popleft())
    finally:
        lanes.shutdown(cancel_futures=True)
    return tally


def lanes_are_processes(device: torch.device, config: PipelineConfig) -> bool:
    """Fork only on Linux (macOS's system libraries are not fork-safe), only on a CPU (CUDA cannot
    be forked once started), and only for more than one lane."""
    return config.processes and config.lanes > 1 and device.type == "cpu" and sys.platform.startswith("linux")


def _start_lanes(predictor: Predictor, config: PipelineConfig) -> Executor:
    if lanes_are_processes(predictor.device, config):
        return ProcessPoolExecutor(
            config.lanes,
            mp_context=multiprocessing.get_context("fork"),
            initializer=_start_lane,
            initargs=(predictor, config.threads_per_lane, os.getpid()),
        )
    return ThreadPoolExecutor(
        config.lanes, "lane", initializer=_start_lane, initargs=(predictor, config.threads_per_lane)
    )


_lane = threading.local()  # the predictor of the lane running in this thread


def _start_lane(predictor: Predictor, threads: int, parent: int | None = None) -> None:
    """Runs once in each lane; `parent` is the pid a forked lane came from."""
    _lane.predictor = predictor
    torch.set_num_threads(threads)
    if parent is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
        die_with_parent(parent)  # `caption_entries` starts the lanes from its own thread and stops them itself


def _segments(entries: list[Entry], batch_size: int, lanes: int) -> Iterator[list[Entry]]:
    """Runs of entries holding `batch_size` images each (files skipped by design ride along),
    shorter near the end so that the lanes finish together: a lane that took the last full
    batch would run on alone while the others wait (guided self-scheduling)."""
    remaining = sum(entry.skip is None for entry in entries)

    def next_size() -> int:
        return max(min(batch_size, -(-remaining // (2 * lanes))), min(batch_size, MIN_TAIL_BATCH))

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
    segment: list[Entry], options: DecodeOptions, overlays: Path | None, keep_attention: bool
) -> tuple[list[str], Tally]:
    """In a lane: the output line of every entry, in order, and how they went."""
    predictor: Predictor = _lane.predictor
    results: list[dict] = [{} for _ in segment]
    pictures: list[Image.Image | None] = [None] * len(segment)
    prepared, positions = [], []
    for i, entry in enumerate(segment):
        if entry.skip is not None:
            results[i] = _error(entry.skip)
            continue
        try:
            image, pictures[i] = prepare_with_picture(predictor, entry.path, OVERLAY_TILE if overlays else None)
        except ImageError as e:
            results[i] = _error(e)
            continue
        prepared.append(image)
        positions.append(i)
    if prepared:
        for i, result in zip(positions, predictor.caption_batch(prepared, options)):
            results[i] = result

    tally, lines = Tally(), []
    for entry, result, picture in zip(segment, results, pictures):
        if "error" in result:
            if result["error"]["code"] in SKIP_CODES:
                tally.skipped += 1
            else:
                tally.failed += 1
        else:
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
    DiskFullError, naming the sheet, reaches the run from a forked lane too."""
    best = result["captions"][0]
    sheet = caption_sheet(picture, best["tokens"], best.get("attention", []), tile=OVERLAY_TILE)
    with replacing(path) as tmp:
        sheet.save(tmp, format="PNG", compress_level=1)  # fast: sheets are for looking at
