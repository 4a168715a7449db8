"""Model worker processes: the same answers as the worker thread, a bad upload failing only its
own request, a failing model call failing only its batch, and a killed worker handled.

Real forked processes of the real tiny model; a change made to the predictor before the fork
(a failing call) is the child's too, as it would be in the server.
"""

import asyncio
import os
import signal
import threading
import time

import orjson
import pytest

from api.batcher import Batcher, WorkerDead
from api.metrics import Metrics
from api.workers import ProcessWorker, ThreadWorker
from captioner.decoding import DecodeOptions
from captioner.images import ImageError
from captioner.predictor import Predictor

from .helpers import png

BEAM = DecodeOptions(method="beam", beam_size=2, max_length=4, attention=True)


@pytest.fixture
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, max_batch_size=4)


def run(batcher: Batcher, *jobs: tuple[list[bytes], DecodeOptions], **kwargs) -> list:
    """Submit the jobs together; each one's outcomes, or the exception it raised."""

    async def main():
        return await asyncio.gather(
            *(
                batcher.submit(uploads, [f"{i}.png" for i in range(len(uploads))], options, **kwargs)
                for uploads, options in jobs
            ),
            return_exceptions=True,
        )

    return asyncio.run(main())


def processes(predictor: Predictor, count: int = 2) -> list[ProcessWorker]:
    workers = [ProcessWorker(predictor, i) for i in range(count)]
    for worker in workers:
        worker.start()
    return workers


def started(workers, **kwargs) -> Batcher:
    batcher = Batcher(workers, Metrics(), 4, **kwargs)
    batcher.start()
    return batcher


def test_worker_processes_answer_byte_for_byte_as_the_worker_thread(predictor):
    jobs = [([png((40 + i, 30))], BEAM) for i in range(6)] + [([png((60, 50)), png((70, 30))], BEAM)]
    answers = {}
    for kind, workers in (("thread", [ThreadWorker(predictor)]), ("processes", processes(predictor))):
        batcher = started(workers, max_wait_ms=50)
        try:
            answers[kind] = run(batcher, *jobs, overlay_size=32)
        finally:
            batcher.stop()
    assert answers["processes"] == answers["thread"]
    first = orjson.loads(answers["processes"][0][0])
    assert first["file"] == "0.png" and first["width"] == 40
    assert first["captions"][0]["overlays"][0].startswith("data:image/png;base64,")


def test_a_bad_upload_fails_only_its_own_request_in_a_shared_batch(predictor):
    batcher = started(processes(predictor), max_wait_ms=2000)  # gathering ends when 4 images are in
    try:
        bad, good = run(batcher, ([b"not an image", png()], BEAM), ([png((50, 40)), png((51, 40))], BEAM))
    finally:
        batcher.stop()
    assert isinstance(bad[0], ImageError) and bad[0].code == "unsupported_format"
    assert [orjson.loads(outcome)["width"] for outcome in good] == [50, 51]


def test_a_failing_model_call_fails_its_batch_and_the_worker_process_goes_on(predictor):
    real = predictor.caption_batch

    def breaks_on_width_99(images, options):
        if any(image.width == 99 for image in images):
            raise RuntimeError("the model broke")
        return real(images, options)

    predictor.caption_batch = breaks_on_width_99  # before the fork: the children's too
    batcher = started(processes(predictor), max_wait_ms=0)
    try:
        (failed,) = run(batcher, ([png((99, 40))], BEAM))
        (answered,) = run(batcher, ([png((61, 40))], BEAM))
    finally:
        batcher.stop()
    assert isinstance(failed, RuntimeError) and "the model broke" in str(failed)
    assert orjson.loads(answered[0])["width"] == 61 and not batcher.dead, repr(batcher._death)


def test_a_worker_process_killed_while_idle_makes_the_service_dead_at_once(predictor):
    workers = processes(predictor)
    batcher = started(workers, max_wait_ms=0)
    try:
        assert orjson.loads(run(batcher, ([png((41, 40))], BEAM))[0][0])["width"] == 41
        os.kill(workers[1].process.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not batcher.dead and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.dead
        (refused,) = run(batcher, ([png()], BEAM))
        assert isinstance(refused, WorkerDead)
    finally:
        batcher.stop()


def test_a_worker_process_killed_inside_a_batch_fails_that_request_at_once(predictor):
    real = predictor.caption_batch

    def slow(images, options):
        time.sleep(30)
        return real(images, options)

    predictor.caption_batch = slow
    workers = processes(predictor, 1)
    batcher = started(workers, max_wait_ms=0)
    try:
        killer = threading.Timer(1.0, os.kill, (workers[0].process.pid, signal.SIGKILL))
        killer.start()
        started_at = time.monotonic()
        (failed,) = run(batcher, ([png()], BEAM))
        assert isinstance(failed, WorkerDead) and time.monotonic() - started_at < 20
        assert batcher.dead
    finally:
        batcher.stop()
