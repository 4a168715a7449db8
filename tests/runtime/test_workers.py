"""A forked worker: its handler's results and errors come back as they were raised, a worker that
dies says how, a restart forks another in its place that answers, and a collection in the child
leaves the pages it shares with the parent shared."""

import gc
import os
import signal
import threading
from pathlib import Path

import pytest

from runtime.workers import ForkedWorker, WorkerDied


class Unpicklable(Exception):
    def __init__(self) -> None:
        super().__init__("held a lock")
        self.lock = threading.Lock()


def handler(task: str):
    if task == "collect":  # how many MB of this process's pages a full collection made its own
        before = private_mb()
        gc.collect()
        return private_mb() - before
    if task == "fail":
        raise KeyError("no such thing")
    if task == "unpicklable":
        raise Unpicklable()
    return (task, os.getpid())


def private_mb() -> float:
    rollup = Path("/proc/self/smaps_rollup").read_text().splitlines()
    return sum(int(line.split()[1]) for line in rollup if line.startswith("Private_")) / 1024


@pytest.fixture
def worker():
    worker = ForkedWorker(handler, "test-worker")
    worker.start()
    yield worker
    worker.stop(timeout=30)


def test_a_forked_worker_answers_and_its_handler_s_errors_come_back_as_raised(worker):
    assert worker.call("a") == ("a", worker.process.pid)
    with pytest.raises(KeyError, match="no such thing") as raised:
        worker.call("fail")
    assert any("in test-worker" in note for note in raised.value.__notes__)
    with pytest.raises(RuntimeError, match="Unpicklable: held a lock"):
        worker.call("unpicklable")
    assert worker.call("b")[0] == "b" and worker.alive


def test_a_killed_worker_says_how_it_died_and_a_restart_answers(worker):
    killed = worker.process.pid
    os.kill(killed, signal.SIGKILL)
    with pytest.raises(WorkerDied, match=f"test-worker \\(pid {killed}\\) ended: killed by signal 9"):
        worker.call("a")
    assert not worker.alive
    worker.restart()
    assert worker.alive and worker.call("a") == ("a", worker.process.pid) and worker.process.pid != killed


def test_a_collection_in_the_worker_leaves_the_pages_it_shares_with_the_parent_shared():
    """Objects the parent holds at the fork (a model's, here 300,000 small ones) are frozen: a full
    collection in the child does not write to them, so their pages are not copied."""
    held = [{"i": i} for i in range(300_000)]  # about 60 MB of tracked objects
    worker = ForkedWorker(handler, "test-worker")
    worker.start()
    try:
        assert worker.call("collect") < 5
    finally:
        worker.stop(timeout=30)
    del held
