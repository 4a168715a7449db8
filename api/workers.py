"""The model workers: where a batch of uploads is decoded, captioned, drawn and encoded.

The event loop receives requests and sends answers; everything between is a worker's. On a
CPU under Linux the workers are processes forked from the server once it has loaded the model
and before it serves, as the folder command's are: runtime.workers says why, how they are forked
and what happens when one dies. A worker sends back each image's result as JSON bytes, so the
server only joins them. On a GPU (CUDA cannot be forked once started), or with one worker, the
worker is a thread of the server instead.

Each worker process has its share of the server's torch threads (one each, by default: one
worker a core) while others are busy too, and all of them for a batch it runs alone (as the
batcher judges it): an idle server answers a lone request with every core, as the same call
would in-process, and under load the workers do not oversubscribe the cores.

A worker process that dies (the kernel's OOM killer, say) is replaced by the batcher
(api.batcher), which fails only the batch it held, and gives up only when workers die faster
than its restart budget allows.
"""

import functools
from dataclasses import dataclass
from pathlib import Path

import orjson
from PIL import Image

from captioner.decoding import DecodeOptions
from captioner.images import ImageError, ImageLimits
from captioner.overlay import caption_with_pictures, drop_attention, heatmap_overlay, png_data_uri
from captioner.predictor import Predictor
from runtime.workers import ForkedWorker, can_fork
from runtime.workers import ThreadWorker as CallingThreadWorker

from .settings import Settings


class ModelMissing(RuntimeError):
    pass


def missing_model_message(path: Path) -> str:
    return (
        f"no model at {path}. Train the default one with `captioner demo --no-serve`, "
        "or pass --checkpoint PATH (or set CAPTIONER_CHECKPOINT)."
    )


def load_predictor(settings: Settings) -> Predictor:
    if not settings.checkpoint.is_file():
        raise ModelMissing(missing_model_message(settings.checkpoint))
    # RLE-compressed BMP is decoded by Pillow in Python, holding the GIL: not worth a server's time
    limits = ImageLimits(
        max_bytes=settings.max_bytes,
        max_pixels=settings.max_pixels,
        max_decode_bytes=settings.max_decode_bytes,
        rle_bmp=False,
    )
    return Predictor.from_checkpoint(
        settings.checkpoint,
        settings.device,
        settings.backend,
        limits=limits,
        max_batch_size=settings.max_batch_size,
        amp=settings.amp,
    )


def uses_processes(settings: Settings) -> bool:
    """Worker processes where they can be forked (runtime.workers.can_fork)."""
    return can_fork(settings.device, settings.workers)


@dataclass(frozen=True)
class Batch:
    uploads: list[bytes]  # each file's bytes, up to one past the limit (so open_image can refuse it)
    names: list[str]
    options: DecodeOptions  # attention on when overlays are asked for
    keep_attention: bool  # in the results (overlays need the grids, the client may not)
    overlay_size: int | None  # heatmap overlays of at most this side, or none


Outcome = bytes | ImageError  # an image's result as JSON, or why it could not be read


def caption_uploads(predictor: Predictor, batch: Batch) -> list[Outcome]:
    """Every upload's outcome, in order: the readable ones captioned in one call."""
    outcomes: list[Outcome] = []
    for name, outcome in zip(
        batch.names, caption_with_pictures(predictor, batch.uploads, batch.options, batch.overlay_size)
    ):
        if isinstance(outcome, ImageError):
            outcomes.append(outcome)
            continue
        result, picture = outcome
        if picture is not None:
            _add_overlays(result, picture)
        if not batch.keep_attention:
            drop_attention(result)
        outcomes.append(orjson.dumps({"file": name, **result}))
    return outcomes


def _add_overlays(result: dict, picture: Image.Image) -> None:
    for caption in result["captions"]:
        caption["overlays"] = [png_data_uri(heatmap_overlay(picture, grid)) for grid in caption.get("attention", [])]


class ThreadWorker(CallingThreadWorker):
    """The model in the server's own process: run() is called by the thread that minds it."""

    def __init__(self, predictor: Predictor):
        super().__init__(functools.partial(caption_uploads, predictor), "captioner-worker-thread")
        self.predictor = predictor

    def run(self, batch: Batch, alone: bool = False) -> list[Outcome]:
        return self.call(batch)


class ProcessWorker(ForkedWorker):
    """A forked process with the server's model (runtime.workers), fed batches one at a time."""

    def __init__(self, predictor: Predictor, index: int, threads: int = 1, threads_alone: int | None = None):
        super().__init__(functools.partial(caption_uploads, predictor), f"captioner-worker-{index}", threads)
        self.predictor = predictor
        self.threads_alone = threads_alone or threads  # for a batch while the other workers are idle

    def run(self, batch: Batch, alone: bool = False) -> list[Outcome]:
        """The batch's outcomes; `alone`: no other worker is busy, so this one may use every core."""
        return self.call(batch, self.threads_alone if alone else self.threads)
