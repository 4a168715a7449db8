"""The model workers: where a batch of uploads is decoded, captioned, drawn and encoded.

The event loop receives requests and sends answers; everything between is a worker's. On a
CPU under Linux the workers are processes, each with its own model, for the reason the folder
command's lanes are: decoding is thousands of small operators a second, each handing Python's
lock over, and in one process they slow each other and the event loop. Workers are forked from
the server once it has loaded the model and before it serves: they share the model's weights
and torch's memory with it, and start in milliseconds. A worker sends back
each image's result as JSON bytes, so the server only joins them. On a GPU (CUDA cannot be
forked once started), or with one worker, the worker is a thread of the server instead.

Each worker process has its share of the server's torch threads (one each, by default: one
worker a core) while others are busy too, and all of them for a batch it runs alone (as the
batcher judges it): an idle server answers a lone request with every core, as the same call
would in-process, and under load the workers do not oversubscribe the cores.

A worker process that dies (the kernel's OOM killer, say) is replaced: the thread that forked it
forks a new one (the same fork-safety rules), and the batcher (api.batcher) fails only the batch
it held, and gives up only when workers die faster than its restart budget allows.
"""

import contextlib
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path

import orjson
import torch
from PIL import Image

from captioner.decoding import DecodeOptions
from captioner.images import ImageError, ImageLimits
from captioner.overlay import drop_attention, heatmap_overlay, png_data_uri, prepare_with_picture
from captioner.predictor import Predictor
from runtime.children import ForkThread, close_files, die_with_parent, open_files

from .settings import Settings


class ModelMissing(RuntimeError):
    pass


class WorkerGone(Exception):
    """The worker process ended: its batch cannot be captioned; a new process can take the next."""


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
        settings.checkpoint, settings.device, limits=limits, max_batch_size=settings.max_batch_size, amp=settings.amp
    )


def uses_processes(settings: Settings) -> bool:
    """Processes only on a CPU (CUDA cannot be forked), under Linux (macOS's system libraries
    are not fork-safe; the parent-death signal), and only for more than one worker."""
    return settings.workers > 1 and settings.device == "cpu" and sys.platform.startswith("linux")


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
    outcomes: list[Outcome | None] = [None] * len(batch.uploads)
    prepared, pictures, positions = [], [], []
    for i, data in enumerate(batch.uploads):
        try:
            image, picture = prepare_with_picture(predictor, data, batch.overlay_size)
        except ImageError as e:
            outcomes[i] = e
            continue
        prepared.append(image)
        pictures.append(picture)
        positions.append(i)
    if prepared:
        for i, picture, result in zip(positions, pictures, predictor.caption_batch(prepared, batch.options)):
            if picture is not None:
                _add_overlays(result, picture)
            if not batch.keep_attention:
                drop_attention(result)
            outcomes[i] = orjson.dumps({"file": batch.names[i], **result})
    return outcomes  # type: ignore[return-value]  # every position is filled by now


def _add_overlays(result: dict, picture: Image.Image) -> None:
    for caption in result["captions"]:
        caption["overlays"] = [png_data_uri(heatmap_overlay(picture, grid)) for grid in caption.get("attention", [])]


class ThreadWorker:
    """The model in the server's own process: run() is called by the thread that minds it."""

    def __init__(self, predictor: Predictor):
        self.predictor = predictor

    alive = True  # what kills a model call in a thread leaves the model as it was: nothing to replace

    def run(self, batch: Batch, alone: bool = False) -> list[Outcome]:
        return caption_uploads(self.predictor, batch)  # torch threads: the server's, set once

    def restart(self) -> None:
        pass

    def death(self) -> str:
        return "the model worker thread's call failed"

    def stop(self, timeout: float) -> None:
        pass


class ProcessWorker:
    """A forked process with the server's model, fed batches through a pipe, one at a time; when
    it dies, restart() forks another in its place, from the same thread."""

    def __init__(self, predictor: Predictor, index: int, threads: int = 1, threads_alone: int | None = None):
        self.predictor, self.threads = predictor, threads  # its share of the cores
        self.threads_alone = threads_alone or threads  # for a batch while the other workers are idle
        self.name = f"captioner-worker-{index}"
        self._forks = ForkThread(self.name)  # forks, keeps and watches the process: see ForkThread
        self.process: BaseProcess | None = None
        self._connection: Connection | None = None

    @property
    def on_end(self) -> Callable[[], None]:
        """Called, on the fork thread, when the process ends: the batcher's cue to replace it."""
        return self._forks.on_end

    @on_end.setter
    def on_end(self, callback: Callable[[], None]) -> None:
        self._forks.on_end = callback

    def start(self) -> None:
        self._forks.fork(self._fork)

    def restart(self) -> None:
        """A new process in place of the one that ended (reaped, and its pipe closed, first)."""
        self._forks.fork(self._fork_again)

    def _fork_again(self) -> BaseProcess:
        self._close()
        return self._fork()

    def _fork(self) -> BaseProcess:
        """On the fork thread: the child gets the model and its end of a pipe, and closes what else
        it inherited (see runtime.children.close_files)."""
        context = multiprocessing.get_context("fork")
        connection, child_end = context.Pipe()
        inherited = open_files() - {child_end.fileno()}  # the parent's, to close in the child
        process = context.Process(
            target=_serve_batches,
            args=(child_end, self.predictor, os.getpid(), inherited),
            name=self.name,
            daemon=True,
        )
        try:
            process.start()
        except BaseException:
            connection.close()
            raise
        finally:
            child_end.close()  # the child holds it now: its death closes the pipe
        self.process, self._connection = process, connection
        return process

    @property
    def alive(self) -> bool:
        """Whether the process runs: its sentinel is not readable. Any thread may ask; unlike
        is_alive() it reaps nothing, which is left to the minder that replaces the process."""
        try:
            return self.process is not None and not multiprocessing.connection.wait([self.process.sentinel], 0)
        except (ValueError, OSError):  # closed by a restart under way
            return False

    def run(self, batch: Batch, alone: bool = False) -> list[Outcome]:
        """The batch's outcomes; `alone`: no other worker is busy, so this one may use every core."""
        assert self._connection is not None, "start() the worker first"
        try:
            self._connection.send((batch, self.threads_alone if alone else self.threads))
        except (OSError, EOFError) as e:
            raise WorkerGone(self.death()) from e
        reply = self._receive()
        if isinstance(reply, tuple):  # the model failed on this batch; the worker goes on
            message, where = reply
            error = RuntimeError(message)
            error.add_note(where)  # the worker's traceback, in the server's log
            raise error
        return reply

    def stop(self, timeout: float) -> None:
        if self.process is not None and self.process.is_alive():
            with contextlib.suppress(OSError, EOFError):  # it died meanwhile
                self._connection.send(None)  # type: ignore[union-attr]  # set with the process
            self.process.join(timeout)
        if self.process is not None and self.process.is_alive():
            self.process.kill()
            self.process.join()
        if self._connection is not None:
            self._connection.close()
        self._forks.stop()  # after the process: the thread's end would kill it

    def _close(self) -> None:
        """The ended process reaped and its pipe and sentinel closed (a restart's first step)."""
        if self._connection is not None:
            self._connection.close()
        if self.process is not None:
            self.process.join(1.0)
            with contextlib.suppress(ValueError):  # still running: left to the garbage collector
                self.process.close()

    def _receive(self):
        try:
            return self._connection.recv()  # type: ignore[union-attr]  # set with the process
        except (OSError, EOFError) as e:
            raise WorkerGone(self.death()) from e

    def death(self) -> str:
        """How the process ended, in words."""
        assert self.process is not None
        self.process.join(1.0)
        code = self.process.exitcode
        how = f"killed by signal {-code}" if code is not None and code < 0 else f"exit status {code}"
        return f"model worker {self.process.name} (pid {self.process.pid}) ended: {how}"


def _serve_batches(connection: Connection, predictor: Predictor, parent: int, inherited: set[int]) -> None:
    """A worker process: caption batches, each with the torch threads it comes with, until told
    to stop (None)."""
    signal.set_wakeup_fd(-1)  # the server's event loop's: a signal here must not wake it
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the server's: it stops the workers
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the server's graceful-shutdown handler
    die_with_parent(parent)
    close_files(inherited, keep=frozenset({connection.fileno()}))
    while (message := connection.recv()) is not None:
        batch, threads = message
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        try:
            outcomes = caption_uploads(predictor, batch)
        except Exception as e:  # the model failing fails this batch's requests, not the worker
            connection.send((f"{type(e).__name__}: {e}", traceback.format_exc()))  # the server logs it
            continue
        connection.send(outcomes)
