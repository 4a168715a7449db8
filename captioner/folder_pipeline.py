"""Captioning many files fast: decoding workers feed model lanes, and results come out in order.

Worker threads read and decode images (Pillow releases the GIL) for the next
batches while the model lanes run the current ones, at most `lanes + 1`
batches ahead, so memory stays bounded whatever the folder's size. Each lane
is a thread with its own share of torch's threads; with one thread per lane,
the lanes never wait on each other inside an operator. The calling thread
writes every batch, in order, as soon as it is done.
"""

from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .decoding import DecodeOptions
from .folder_files import SKIP_CODES, Entry
from .folder_journal import result_line
from .images import ImageError, open_image
from .overlay import caption_sheet
from .predictor import PreparedImage, Predictor

OVERLAY_TILE = 224  # pixels per tile of an overlay sheet; pictures are kept no larger
MIN_TAIL_BATCH = 4  # the shortest batch near the end: smaller ones cost more per image than they save


@dataclass(frozen=True)
class PipelineConfig:
    batch_size: int = 8  # images per encoder and decoder call
    workers: int = 2  # decoding threads
    lanes: int = 2  # batches in the model at once
    threads_per_lane: int = 1  # torch threads of each lane
    overlays: Path | None = None  # folder for one PNG sheet per image
    keep_attention: bool = True  # attention in the output lines (decoding may need it only for overlays)


@dataclass
class Tally:
    captioned: int = 0
    failed: int = 0
    skipped: int = 0


def caption_entries(predictor: Predictor, entries: list[Entry], options: DecodeOptions, config: PipelineConfig,
                    write: Callable[[list[str]], None], progress: Callable[[int], object] = lambda n: None) -> Tally:
    """One output line per entry, handed to `write` a batch at a time in entry order."""
    tally = Tally()
    workers = ThreadPoolExecutor(config.workers, "decode", initializer=torch.set_num_threads, initargs=(1,))
    lanes = ThreadPoolExecutor(config.lanes, "lane", initializer=torch.set_num_threads,
                               initargs=(config.threads_per_lane,))
    keep_picture = config.overlays is not None
    in_flight: deque[tuple[list[Entry], Future]] = deque()

    def finish(segment: list[Entry], outcome: Future) -> None:
        results, pictures = outcome.result()
        sheets = [workers.submit(_write_sheet, picture, result, config.overlays / f"{entry.file}.png")
                  for entry, result, picture in zip(segment, results, pictures) if picture is not None]
        for sheet in sheets:
            sheet.result()  # the sheet exists before its line says the image is done
        lines = []
        for entry, result in zip(segment, results):
            if "error" in result:
                if result["error"]["code"] in SKIP_CODES:
                    tally.skipped += 1
                else:
                    tally.failed += 1
            else:
                tally.captioned += 1
                if not config.keep_attention:
                    for caption in result["captions"]:
                        caption.pop("attention", None)
            lines.append(result_line(entry.file, result))
        write(lines)
        progress(sum(entry.skip is None for entry in segment))

    try:
        for segment in _segments(entries, config.batch_size, config.lanes):
            loads = [None if e.skip else workers.submit(_load, predictor, e.path, keep_picture) for e in segment]
            in_flight.append((segment, lanes.submit(_caption_segment, predictor, segment, loads, options)))
            if len(in_flight) > config.lanes + 1:
                finish(*in_flight.popleft())
        while in_flight:
            finish(*in_flight.popleft())
    finally:
        lanes.shutdown(cancel_futures=True)
        workers.shutdown(cancel_futures=True)
    return tally


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


def _load(predictor: Predictor, path: Path, keep_picture: bool) -> tuple[PreparedImage, Image.Image | None]:
    """In a worker: the model's input and, for an overlay, the picture at sheet size."""
    if not keep_picture:
        return predictor.prepare(path), None
    picture = open_image(path, predictor.limits)
    prepared = predictor.prepare(picture)
    picture.thumbnail((OVERLAY_TILE, OVERLAY_TILE))
    return prepared, picture


def _caption_segment(predictor: Predictor, segment: list[Entry], loads: list[Future | None],
                     options: DecodeOptions) -> tuple[list[dict], list[Image.Image | None]]:
    """In a lane: one result (or error) per entry, and the pictures kept for overlays."""
    results: list[dict] = [{} for _ in segment]
    pictures: list[Image.Image | None] = [None] * len(segment)
    prepared, positions = [], []
    for i, (entry, load) in enumerate(zip(segment, loads)):
        if entry.skip is not None:
            results[i] = _error(entry.skip)
            continue
        try:
            image, pictures[i] = load.result()
        except ImageError as e:
            results[i] = _error(e)
            continue
        prepared.append(image)
        positions.append(i)
    if prepared:
        for i, result in zip(positions, predictor.caption_batch(prepared, options)):
            results[i] = result
    return results, pictures


def _error(e: ImageError) -> dict:
    return {"error": {"code": e.code, "message": e.message}}


def _write_sheet(picture: Image.Image, result: dict, path: Path) -> None:
    best = result["captions"][0]
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet = caption_sheet(picture, best["tokens"], best.get("attention", []), tile=OVERLAY_TILE)
    sheet.save(path, format="PNG", compress_level=1)  # fast: sheets are for looking at
