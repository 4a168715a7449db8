"""A dead model worker, in the real server: replaced, failing only the batch it held, and deaths
beyond the restart budget ending the server with status 1. A worker is killed from inside (a
model call that raises what `except Exception` does not catch, for pictures 13 pixels wide), as
a thread and as a process, or a worker process is killed outright from outside, idle or held in a
model call (pictures 14 pixels wide, which the launcher's model never returns from); everything
else is the real app under uvicorn, over loopback HTTP. Every wait is for something the server
shows (its log, /healthz's count of live workers, the restart metric), never a time. A server
killed outright takes its worker processes with it."""

import functools
import os
import re
import signal
import sys
import threading

import httpx
import pytest

from runtime.children import child_processes as children
from tests.conftest import gone

from .helpers import metric, png, wait_until

pytestmark = pytest.mark.slow

LAUNCHER = """
import os, sys, threading, uvicorn
from api.app import create_app
from api.settings import Settings
from captioner.predictor import Predictor

class Fatal(BaseException):
    pass

real = Predictor.caption_batch

def caption_batch(self, images, options):
    if any(image.width == 13 for image in images):
        raise Fatal("the worker dies here")
    if any(image.width == 14 for image in images):
        print(f"holding a batch in pid {os.getpid()}", flush=True)
        threading.Event().wait()
    return real(self, images, options)

Predictor.caption_batch = caption_batch
uvicorn.run(create_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


def caption(base: str, width: int = 12) -> httpx.Response:
    # The client waits at most 60 s; the server's own limit is 10 minutes: a 504 would never come in time.
    return httpx.post(
        base + "/v1/captions",
        files=[("images", ("a.png", png((width, 20)), "image/png"))],
        data={"method": "greedy"},
        timeout=60,
    )


def launched(start_server, checkpoint, workers: str, *settings: tuple[str, str]):
    return start_server(
        command=[sys.executable, "-c", LAUNCHER, "PORT"],
        env={
            "CAPTIONER_CHECKPOINT": str(checkpoint),
            "CAPTIONER_THREADS": "1",
            "CAPTIONER_WORKERS": workers,
            "CAPTIONER_REQUEST_TIMEOUT_S": "600",
            **dict(settings),
        },
    )


def restarts(server) -> float:
    return metric(server, "captioner_worker_restarts_total")


def pool_whole(server, size: int, replaced: int) -> bool:
    """`replaced` workers started again, and `size` running, as /healthz and /metrics say."""
    health = httpx.get(server.base + "/healthz", timeout=10).json()
    return health.get("workers_alive") == size and restarts(server) == replaced


def assert_lost(r: httpx.Response) -> None:
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_worker_lost", r.text
    assert r.headers["retry-after"] == "1"


def assert_serving(server, size: int) -> None:
    assert [caption(server.base).status_code for _ in range(4)] == [200] * 4
    health = httpx.get(server.base + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok", "workers": size, "workers_alive": size}
    assert httpx.get(server.base + "/readyz", timeout=10).status_code == 200


@pytest.mark.parametrize("workers", [1, 2])  # a thread of the server; two processes
def test_a_model_call_that_kills_its_worker_fails_only_its_request_and_the_worker_is_replaced(
    start_server, tiny_checkpoint, workers
):
    server = launched(start_server, tiny_checkpoint, str(workers))
    assert caption(server.base).status_code == 200
    assert_lost(caption(server.base, 13))  # answered at once, to be sent again; not left to time out
    wait_until(lambda: pool_whole(server, workers, 1), "the pool back to its size")
    assert_serving(server, workers)
    assert "starting a new one" in server.log()


def test_a_worker_process_killed_while_idle_is_replaced(start_server):
    server = start_server("--workers", "2")
    workers = children(server.pid)
    assert len(workers) == 2
    assert caption(server.base).status_code == 200
    os.kill(workers[0], signal.SIGKILL)
    wait_until(lambda: pool_whole(server, 2, 1), "the killed worker replaced")
    now = children(server.pid)
    assert len(now) == 2 and workers[0] not in now and workers[1] in now
    assert_serving(server, 2)
    assert f"(pid {workers[0]}) ended: killed by signal 9; starting a new one" in server.log()


def test_a_worker_process_killed_inside_a_batch_fails_that_batch_to_be_retried_and_the_rest_are_answered(
    start_server, tiny_checkpoint
):
    server = launched(start_server, tiny_checkpoint, "2")
    answers: list[httpx.Response] = []
    held = threading.Thread(target=lambda: answers.append(caption(server.base, 14)))
    held.start()
    try:
        wait_until(lambda: "holding a batch in pid" in server.log(), "a worker holding the batch")
        pid = int(re.search(r"holding a batch in pid (\d+)", server.log()).group(1))  # type: ignore[union-attr]
        assert caption(server.base).status_code == 200  # the other worker answers meanwhile
        os.kill(pid, signal.SIGKILL)
    finally:
        held.join(60)
    assert_lost(answers[0])
    wait_until(lambda: pool_whole(server, 2, 1), "the killed worker replaced")
    assert_serving(server, 2)


def test_workers_killed_faster_than_the_restart_budget_end_the_server_with_status_1(start_server):
    server = start_server("--workers", "2", "--max-worker-restarts", "4", "--restart-window-s", "600")
    for kill in range(1, 5):
        os.kill(children(server.pid)[0], signal.SIGKILL)
        wait_until(functools.partial(pool_whole, server, 2, kill), f"kill {kill} replaced")
    os.kill(children(server.pid)[0], signal.SIGKILL)  # the fifth inside the window: one too many
    assert server.process.wait(60) == 1, server.log()
    log = server.log()
    assert "model workers died more than 4 times within 600 s" in log
    assert "exiting with status 1" in log


def test_a_server_killed_outright_takes_its_worker_processes_with_it(start_server):
    server = start_server("--workers", "2")
    workers = children(server.pid)
    assert len(workers) == 2
    os.kill(server.pid, signal.SIGKILL)
    wait_until(lambda: all(map(gone, workers)), "the workers gone with the server", timeout=10)
