"""Model worker processes: the same answers as the worker thread, a bad upload failing only its
own request, a failing model call failing only its batch, a killed worker replaced (failing only
the batch it held), and deaths beyond the restart budget giving up.

Real forked processes of the real tiny model; a change made to the predictor before the fork
(a failing call) is the child's too, as it would be in the server.
"""

import asyncio
import multiprocessing
import os
import signal
import threading

import orjson
import pytest
import torch

from api.batcher import QUIET_S, Batcher, WorkerDead, WorkerLost
from api.metrics import Metrics
from api.workers import ProcessWorker, ThreadWorker
from captioner.decoding import DecodeOptions
from captioner.images import ImageError
from captioner.predictor import Predictor
from runtime.children import RestartBudget

from .helpers import png, wait_until

BEAM = DecodeOptions(method="beam", beam_size=2, max_length=4, attention=True)


@pytest.fixture
def predictor(tiny_checkpoint) -> Predictor:
    return Predictor.from_checkpoint(tiny_checkpoint, max_batch_size=4)


def run(batcher: Batcher, *jobs: tuple[list[bytes], DecodeOptions], timeout: float | None = None, **kwargs) -> list:
    """Submit the jobs together; each one's outcomes, or the exception it raised."""

    async def main():
        answers = asyncio.gather(
            *(
                batcher.submit(uploads, [f"{i}.png" for i in range(len(uploads))], options, **kwargs)
                for uploads, options in jobs
            ),
            return_exceptions=True,
        )
        return await asyncio.wait_for(answers, timeout)

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
    assert orjson.loads(answered[0])["width"] == 61 and not batcher.dead, batcher.gave_up


def restarts(batcher: Batcher) -> float:
    return batcher.metrics.registry.get_sample_value("captioner_worker_restarts_total") or 0.0


def test_a_worker_process_killed_while_idle_is_replaced_and_the_pool_serves_on(predictor):
    _reporting_threads_and_process(predictor)
    workers = processes(predictor)
    batcher = started(workers, max_wait_ms=0)
    try:
        killed = workers[1].process.pid
        os.kill(killed, signal.SIGKILL)
        wait_until(lambda: restarts(batcher) == 1, "the killed worker replaced")
        assert batcher.workers_alive == 2 and batcher.alive and not batcher.dead
        assert workers[1].process.pid != killed and workers[1].process.name == "captioner-worker-1"
        answers = run(batcher, *[([png((41 + i, 40))], BEAM) for i in range(6)], timeout=60)
    finally:
        batcher.stop()
    assert [orjson.loads(outcomes[0])["width"] for outcomes in answers] == [41, 42, 43, 44, 45, 46]
    assert killed not in {orjson.loads(outcomes[0])["pid"] for outcomes in answers}


def test_a_worker_process_killed_inside_a_batch_fails_that_batch_to_be_retried_and_its_replacement_answers(predictor):
    """The model call for a picture 13 pixels wide never returns: that request can only be
    answered by the death being noticed."""
    inside = multiprocessing.get_context("fork").Event()  # before the fork: shared with the child
    real = predictor.caption_batch

    def stuck_on_width_13(images, options):
        if any(image.width == 13 for image in images):
            inside.set()
            threading.Event().wait()
        return real(images, options)

    predictor.caption_batch = stuck_on_width_13
    workers = processes(predictor, 1)
    batcher = started(workers, max_wait_ms=0)
    held = workers[0].process.pid

    def kill_once_inside() -> None:
        if inside.wait(60):
            os.kill(held, signal.SIGKILL)

    killer = threading.Thread(target=kill_once_inside)
    killer.start()
    try:
        (failed,) = run(batcher, ([png((13, 20))], BEAM), timeout=60)
        assert isinstance(failed, WorkerLost) and f"pid {held}" in str(failed), repr(failed)
        (answered,) = run(batcher, ([png((12, 20))], BEAM), timeout=60)  # the replacement, once ready
        assert orjson.loads(answered[0])["width"] == 12
        assert restarts(batcher) == 1 and not batcher.dead
    finally:
        killer.join()
        batcher.stop()


def test_worker_processes_dying_beyond_the_restart_budget_give_up_and_say_why(predictor):
    workers = processes(predictor)
    gave_up = threading.Event()
    reasons: list[str] = []

    def give_up(why: str) -> None:
        reasons.append(why)
        gave_up.set()

    batcher = started(workers, max_wait_ms=0, restarts=RestartBudget(1, 600), on_give_up=give_up)
    try:
        os.kill(workers[0].process.pid, signal.SIGKILL)
        wait_until(lambda: restarts(batcher) == 1, "the first death replaced")
        os.kill(workers[1].process.pid, signal.SIGKILL)
        assert gave_up.wait(60)
        (refused,) = run(batcher, ([png()], BEAM), timeout=60)
        assert isinstance(refused, WorkerDead) and batcher.dead and restarts(batcher) == 1
    finally:
        batcher.stop()
    assert reasons == [batcher.gave_up] and "killed by signal 9" in reasons[0], reasons
    assert "more than 1 times within 600 s" in reasons[0]


def _reporting_threads_and_process(predictor: Predictor) -> None:
    """Each result says which process captioned it, with how many torch threads (before the fork:
    the children's predictor too)."""
    real = predictor.caption_batch

    def reporting(images, options):
        return [{**r, "pid": os.getpid(), "threads": torch.get_num_threads()} for r in real(images, options)]

    predictor.caption_batch = reporting


class FakeClock:
    """The batcher's clock for the quiet period: time moves only when the test says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def pictures(*widths: int) -> list[bytes]:
    return [png((width, 30)) for width in widths]


def test_a_batch_alone_gets_every_thread_and_batches_side_by_side_their_share(predictor):
    # This process leads an OpenMP team first: a worker forked from the thread that led it would
    # hang in its own first team (it forks from a fresh thread instead).
    torch.set_num_threads(2)
    predictor.caption([png()], BEAM)
    _reporting_threads_and_process(predictor)
    workers = [ProcessWorker(predictor, i, threads=1, threads_alone=2) for i in range(2)]
    for worker in workers:
        worker.start()
    # A batch ends at 4 images, which every request here makes, never after max_wait: no timing.
    clock = FakeClock()
    batcher = started(workers, max_wait_ms=600_000, clock=clock)
    try:
        (alone,) = run(batcher, (pictures(40, 41, 42, 43), BEAM), timeout=60)
        greedy = DecodeOptions(method="greedy", max_length=4, attention=True)
        together = run(batcher, (pictures(44, 45), BEAM), (pictures(46, 47), greedy), timeout=60)  # two workers
        (just_after,) = run(batcher, (pictures(48, 49, 50, 51), BEAM), timeout=60)  # no time has passed
        clock.now += 2 * QUIET_S
        (quiet_again,) = run(batcher, (pictures(52, 53, 54, 55), BEAM), timeout=60)
    finally:
        batcher.stop()
    assert orjson.loads(alone[0])["threads"] == 2
    answers = [orjson.loads(outcomes[0]) for outcomes in together]
    assert sorted(a["threads"] for a in answers) == [1, 2]  # the first handed over was alone then
    assert len({a["pid"] for a in answers}) == 2
    assert orjson.loads(just_after[0])["threads"] == 1  # the server was busy a moment ago: its share
    assert orjson.loads(quiet_again[0])["threads"] == 2


def test_under_light_load_one_worker_takes_every_batch(predictor):
    _reporting_threads_and_process(predictor)
    batcher = started(processes(predictor), max_wait_ms=0)
    try:
        answers = [orjson.loads(run(batcher, ([png((40 + i, 30))], BEAM))[0][0]) for i in range(4)]
    finally:
        batcher.stop()
    assert len({a["pid"] for a in answers}) == 1  # its caches warm, not the workers taking turns
