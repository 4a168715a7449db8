"""The batcher, over one model worker in a thread: gathering, grouping by options,
back-pressure and a clean stop. (Worker processes: test_workers.py.)

The model is the real tiny one; `Recorder` only notes each call (and can hold or break one).
Images are told apart by their widths, which every result carries.
"""

import asyncio
import queue
import threading

import orjson
import pytest

from api.batcher import Batcher, Job, QueueFull, ShuttingDown, WorkerDead, WorkerLost
from api.metrics import Metrics
from api.workers import ThreadWorker
from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor
from runtime.children import RestartBudget

from .helpers import png, wait_until

GREEDY = DecodeOptions(method="greedy", max_length=4)
BEAM = DecodeOptions(method="beam", beam_size=2, max_length=4)


class Recorder:
    """Stands in front of a predictor's caption_batch: records (widths, options, thread) per call."""

    def __init__(self, predictor: Predictor, gate: threading.Event | None = None, fail_width: int | None = None):
        self.calls: list[tuple[list[int], DecodeOptions, str]] = []
        self.gate, self.fail_width = gate, fail_width
        self.entered = threading.Event()
        self.real = predictor.caption_batch
        predictor.caption_batch = self

    def __call__(self, images, options):
        self.entered.set()
        if self.gate:
            self.gate.wait(30)
        widths = [image.width for image in images]
        self.calls.append((widths, options, threading.current_thread().name))
        if self.fail_width in widths:
            raise RuntimeError("the model broke")
        return self.real(images, options)


@pytest.fixture
def make_predictor(tiny_checkpoint):
    return lambda max_batch_size=8: Predictor.from_checkpoint(tiny_checkpoint, max_batch_size=max_batch_size)


def make_batcher(predictor: Predictor, **kwargs) -> tuple[Batcher, Metrics]:
    metrics = Metrics()
    return Batcher([ThreadWorker(predictor)], metrics, predictor.max_batch_size, **kwargs), metrics


def start(predictor, **kwargs) -> tuple[Batcher, Metrics]:
    batcher, metrics = make_batcher(predictor, **kwargs)
    batcher.start()
    return batcher, metrics


async def submit(batcher: Batcher, widths: tuple[int, ...], options: DecodeOptions) -> list[dict]:
    """Pictures of these widths, captioned; their results."""
    uploads = [png((w, 40)) for w in widths]
    outcomes = await batcher.submit(uploads, [f"{w}.png" for w in widths], options)
    return [orjson.loads(outcome) for outcome in outcomes]


def widths(results) -> list[int]:
    return [r["width"] for r in results]


def test_requests_arriving_together_share_one_model_call_per_options(make_predictor):
    predictor = make_predictor(max_batch_size=7)  # the worker stops gathering once all 7 images are in
    recorder = Recorder(predictor)
    batcher, metrics = start(predictor, max_wait_ms=5000)

    async def main():
        return await asyncio.gather(
            submit(batcher, (11, 12), BEAM),
            submit(batcher, (13,), GREEDY),
            submit(batcher, (14,), BEAM),
            submit(batcher, (15, 16, 17), GREEDY),
        )

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert [widths(r) for r in results] == [[11, 12], [13], [14], [15, 16, 17]]
    assert [r["method"] for r in results[0] + results[2]] == ["beam"] * 3
    assert [r["method"] for r in results[1] + results[3]] == ["greedy"] * 4
    assert sorted((options.method, w) for w, options, _ in recorder.calls) == [
        ("beam", [11, 12, 14]),
        ("greedy", [13, 15, 16, 17]),
    ]
    assert {thread for _, _, thread in recorder.calls} == {"captioner-minder-0"}
    assert metrics.registry.get_sample_value("captioner_batch_size_count") == 2
    assert metrics.registry.get_sample_value("captioner_batch_size_sum") == 7


def test_a_batched_image_gets_the_caption_it_gets_alone(make_predictor):
    predictor = make_predictor(max_batch_size=3)  # gathering ends when all three are in
    alone = [predictor.caption([png((w, 40))], GREEDY)[0] for w in (21, 22, 23)]
    batcher, _ = start(predictor, max_wait_ms=5000)

    async def main():
        return await asyncio.gather(*(submit(batcher, (w,), GREEDY) for w in (21, 22, 23)))

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert [r[0] for r in results] == [{"file": f"{w}.png", **r} for w, r in zip((21, 22, 23), alone)]


def test_seeded_sampling_is_never_batched_with_other_requests(make_predictor):
    predictor = make_predictor()
    recorder = Recorder(predictor)
    batcher, _ = start(predictor, max_wait_ms=200)
    seeded = DecodeOptions(method="sample", num_captions=2, seed=3, max_length=4)

    async def main():
        return await asyncio.gather(submit(batcher, (31,), seeded), submit(batcher, (32,), seeded))

    try:
        asyncio.run(main())
    finally:
        batcher.stop()
    assert sorted(w for w, _, _ in recorder.calls) == [[31], [32]]


def test_a_model_call_holds_at_most_max_batch_size_images(make_predictor):
    predictor = make_predictor(max_batch_size=2)
    recorder = Recorder(predictor)
    batcher, metrics = start(predictor, max_wait_ms=500)

    async def main():
        return await asyncio.gather(*(submit(batcher, (40 + i,), GREEDY) for i in range(5)))

    try:
        results = asyncio.run(main())
    finally:
        batcher.stop()
    assert [widths(r) for r in results] == [[40], [41], [42], [43], [44]]
    assert sorted(w for call in recorder.calls for w in call[0]) == [40, 41, 42, 43, 44]
    assert metrics.registry.get_sample_value(
        "captioner_batch_size_bucket", {"le": "2.0"}
    ) == metrics.registry.get_sample_value("captioner_batch_size_count")


def test_a_full_queue_refuses_at_once_and_a_stopped_batcher_refuses_too(make_predictor):
    predictor = make_predictor()
    gate = threading.Event()
    recorder = Recorder(predictor, gate=gate)
    batcher, metrics = start(predictor, max_wait_ms=0, queue_size=1)

    async def main():
        held = asyncio.ensure_future(submit(batcher, (51,), GREEDY))
        assert await asyncio.to_thread(recorder.entered.wait, 30)  # the worker is inside the model
        waiting = asyncio.ensure_future(submit(batcher, (52,), GREEDY))
        await asyncio.sleep(0)  # let `waiting` reach the queue
        assert metrics.registry.get_sample_value("captioner_queue_depth") == 1
        with pytest.raises(QueueFull):
            await submit(batcher, (53,), GREEDY)
        gate.set()
        return await held, await waiting

    try:
        first, second = asyncio.run(main())
    finally:
        gate.set()
        batcher.stop()
    assert widths(first) == [51] and widths(second) == [52]
    assert not batcher.alive

    async def after():
        await submit(batcher, (54,), GREEDY)

    with pytest.raises(ShuttingDown):
        asyncio.run(after())


def test_a_failing_model_call_fails_its_requests_and_the_worker_goes_on(make_predictor):
    predictor = make_predictor()
    Recorder(predictor, fail_width=99)
    batcher, _ = start(predictor, max_wait_ms=0)

    async def main():
        with pytest.raises(RuntimeError, match="the model broke"):
            await submit(batcher, (99,), GREEDY)
        return await submit(batcher, (61,), GREEDY)

    try:
        assert widths(asyncio.run(main())) == [61]
    finally:
        batcher.stop()


def test_stop_finishes_queued_jobs_before_the_worker_ends(make_predictor):
    predictor = make_predictor(max_batch_size=1)
    gate = threading.Event()
    recorder = Recorder(predictor, gate=gate)
    batcher, _ = start(predictor, max_wait_ms=0)

    async def main():
        jobs = [asyncio.ensure_future(submit(batcher, (70 + i,), GREEDY)) for i in range(3)]
        assert await asyncio.to_thread(recorder.entered.wait, 30)
        stopper = threading.Thread(target=batcher.stop)
        stopper.start()  # asked to stop while one job is in the model and two are queued
        gate.set()
        results = await asyncio.gather(*jobs)
        await asyncio.to_thread(stopper.join, 30)
        return results

    results = asyncio.run(main())
    assert [widths(r) for r in results] == [[70], [71], [72]]
    assert not batcher._thread.is_alive()


class Fatal(BaseException):
    """What kills a thread that `except Exception` would not catch."""


def test_a_model_call_ended_in_a_worker_thread_fails_its_batch_to_be_retried_and_the_next_is_answered(
    make_predictor,
):
    predictor = make_predictor()
    real = predictor.caption_batch

    def dies_on_width_13(images, options):
        if any(image.width == 13 for image in images):
            raise Fatal()
        return real(images, options)

    predictor.caption_batch = dies_on_width_13
    batcher, metrics = start(predictor, max_wait_ms=0)

    async def main():
        assert widths(await submit(batcher, (12,), GREEDY)) == [12]
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(submit(batcher, (13,), GREEDY), 30)
        return await asyncio.wait_for(submit(batcher, (14,), GREEDY), 30)

    try:
        assert widths(asyncio.run(main())) == [14]
        assert batcher.alive and not batcher.dead
    finally:
        batcher.stop()
    assert metrics.registry.get_sample_value("captioner_worker_restarts_total") == 1


def test_deaths_beyond_the_restart_budget_give_up_once_and_fail_every_later_job_at_once(make_predictor):
    predictor = make_predictor()
    real = predictor.caption_batch

    def dies_on_width_13(images, options):
        if any(image.width == 13 for image in images):
            raise Fatal()
        return real(images, options)

    predictor.caption_batch = dies_on_width_13
    reasons: list[str] = []
    batcher, _ = start(predictor, max_wait_ms=0, restarts=RestartBudget(1, 600), on_give_up=reasons.append)

    async def main():
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(submit(batcher, (13,), GREEDY), 30)  # the one restart the budget allows
        with pytest.raises(WorkerLost):
            await asyncio.wait_for(submit(batcher, (13,), GREEDY), 30)  # beyond it
        with pytest.raises(WorkerDead):
            await asyncio.wait_for(submit(batcher, (12,), GREEDY), 30)

    try:
        asyncio.run(main())
        assert batcher.dead and not batcher.alive
    finally:
        batcher.stop()
    assert len(reasons) == 1 and "more than 1 times within 600 s" in reasons[0], reasons


class PausingQueue(queue.Queue):
    """Holds a job's put (at most `pause` seconds) until a stop mark has been put: the order in
    which a submit racing a stop used to leave its job behind the mark, waiting for nobody."""

    def __init__(self, maxsize: int, pause: float = 2.0):
        super().__init__(maxsize)
        self.stop_put, self.pause = threading.Event(), pause
        self.job_waiting = threading.Event()

    def put(self, item, block=True, timeout=None):
        if not isinstance(item, Job):
            self.stop_put.set()
        super().put(item, block, timeout)

    def put_nowait(self, item):
        self.job_waiting.set()
        self.stop_put.wait(self.pause)
        super().put_nowait(item)


def test_a_submit_racing_stop_is_answered_never_left_behind(make_predictor):
    predictor = make_predictor()
    batcher, _ = make_batcher(predictor, max_wait_ms=0)
    batcher._queue = PausingQueue(64)  # before the worker starts waiting on the queue
    batcher.start()
    stopper = threading.Thread(target=batcher.stop)

    async def main():
        job = asyncio.ensure_future(asyncio.to_thread(asyncio.run, submit_alone()))
        assert await asyncio.to_thread(batcher._queue.job_waiting.wait, 30)
        stopper.start()  # stop() while the submit is between "accepting?" and "queued"
        return await job

    async def submit_alone():
        try:
            return await asyncio.wait_for(submit(batcher, (81,), GREEDY), 20)
        except ShuttingDown:
            return "refused"
        except TimeoutError:
            return "left behind the stop mark, never answered"

    try:
        result = asyncio.run(main())
    finally:
        stopper.join(30)
    assert result == "refused" or (isinstance(result, list) and widths(result) == [81]), result


def test_while_a_worker_is_busy_a_freed_one_waits_for_more_requests_and_an_idle_server_does_not(make_predictor):
    """No clock decides it: a batch is full at two images, busy_wait is ten minutes, and each step
    waits for the one before to be seen (the model entered, the dispatcher gathering). A batch
    that waits shows it by holding two images; one that waited on an idle server would never come."""
    predictor = make_predictor()
    gate = threading.Event()
    recorder = Recorder(predictor, gate=gate)
    workers = [ThreadWorker(predictor), ThreadWorker(predictor)]
    batcher = Batcher(workers, Metrics(), max_batch_size=2, busy_wait_ms=600_000)
    batcher.start()

    def gathering(name: str) -> bool:
        return [job.names for job in batcher._current] == [[name]]

    async def main() -> list[dict]:
        busy = asyncio.ensure_future(submit(batcher, (41,), GREEDY))
        assert await asyncio.to_thread(recorder.entered.wait, 30)  # one worker holds (41,) until the gate opens
        first = asyncio.ensure_future(submit(batcher, (42,), GREEDY))
        await asyncio.to_thread(wait_until, lambda: gathering("42.png"), "the other worker's batch begun")
        second = asyncio.ensure_future(
            submit(batcher, (43,), GREEDY)
        )  # after (42,) was taken: gathered only by waiting
        gate.set()
        await asyncio.gather(busy, first, second)
        assert not batcher._busy  # a client has its answer only once its worker is free
        return await asyncio.wait_for(submit(batcher, (44,), GREEDY), 60)  # both workers idle

    try:
        assert widths(asyncio.run(main())) == [44]
    finally:
        gate.set()
        batcher.stop()
    assert sorted(w for w, _, _ in recorder.calls) == [[41], [42, 43], [44]]


class BreaksOnce:
    """A metric's or a callback's method that raises the first time it is called."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, *args) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("answering broke")


@pytest.mark.parametrize("broken", ["on_batch", "metric"])
def test_a_batch_whose_answering_fails_fails_its_requests_and_the_next_is_answered(
    make_predictor, caplog, monkeypatch, broken
):
    predictor = make_predictor()
    breaks = BreaksOnce()
    batcher, metrics = make_batcher(predictor, on_batch=breaks if broken == "on_batch" else None)
    if broken == "metric":
        monkeypatch.setattr(metrics.images, "inc", breaks)
    batcher.start()

    async def main():
        with pytest.raises(RuntimeError, match="answering broke"):
            await asyncio.wait_for(submit(batcher, (91,), GREEDY), 30)
        return await asyncio.wait_for(submit(batcher, (92,), GREEDY), 30)

    try:
        assert widths(asyncio.run(main())) == [92]
        assert breaks.calls == 2 and batcher.alive
    finally:
        batcher.stop()
    assert "answering a batch of 1 images failed" in caplog.text


def test_a_metric_failing_in_the_dispatcher_is_logged_and_the_next_request_answered(
    make_predictor, caplog, monkeypatch
):
    """The dispatcher counts the images of requests abandoned while they waited: a failure there
    must not end the thread that hands every batch to the workers."""
    predictor = make_predictor()
    gate = threading.Event()
    recorder = Recorder(predictor, gate=gate)
    batcher, metrics = start(predictor, max_wait_ms=0)
    breaks = BreaksOnce()
    monkeypatch.setattr(metrics.abandoned, "inc", breaks)

    async def main():
        held = asyncio.ensure_future(submit(batcher, (71,), GREEDY))
        assert await asyncio.to_thread(recorder.entered.wait, 30)  # the only worker is inside the model
        gone = asyncio.ensure_future(submit(batcher, (72,), GREEDY))
        await asyncio.sleep(0)  # `gone` reaches the queue...
        gone.cancel()  # ...and its client goes away before a worker is free
        gate.set()
        first = await held
        return first, await asyncio.wait_for(submit(batcher, (73,), GREEDY), 30)

    try:
        first, after = asyncio.run(main())
        assert widths(first) == [71] and widths(after) == [73]
        assert breaks.calls == 1 and batcher.alive
    finally:
        gate.set()
        batcher.stop()
    assert "counting 1 abandoned images failed" in caplog.text
    assert [call[0] for call in recorder.calls] == [[71], [73]]  # the abandoned image was never captioned
