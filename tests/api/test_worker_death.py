"""A dead model worker, in the real server: fatal and visible. The worker is killed from inside
(a model call that raises what `except Exception` does not catch, for pictures 13 pixels wide),
as a thread and as a process, or a worker process is killed outright from outside; everything
else is the real app under uvicorn, over loopback HTTP. A server killed outright takes its
worker processes with it."""

import os
import signal
import sys
import time

import httpx
import pytest

from runtime.children import child_processes as children
from tests.conftest import gone

from .helpers import png

pytestmark = pytest.mark.slow

LAUNCHER = """
import sys, uvicorn
from api.app import create_app
from api.settings import Settings
from captioner.predictor import Predictor

class Fatal(BaseException):
    pass

real = Predictor.caption_batch

def caption_batch(self, images, options):
    if any(image.width == 13 for image in images):
        raise Fatal("the worker dies here")
    return real(self, images, options)

Predictor.caption_batch = caption_batch
uvicorn.run(create_app(Settings()), host="127.0.0.1", port=int(sys.argv[1]), log_level="info")
"""


def caption(base: str, width: int) -> httpx.Response:
    # The client waits at most 60 s; the server's own limit is 10 minutes: a 504 would never come in time.
    return httpx.post(
        base + "/v1/captions",
        files=[("images", ("a.png", png((width, 20)), "image/png"))],
        data={"method": "greedy"},
        timeout=60,
    )


@pytest.mark.parametrize("workers", ["1", "2"])  # a thread of the server; two processes
def test_a_dead_worker_fails_liveness_and_every_request_at_once(start_server, tiny_checkpoint, workers):
    server = start_server(
        command=[sys.executable, "-c", LAUNCHER, "PORT"],
        env={
            "CAPTIONER_CHECKPOINT": str(tiny_checkpoint),
            "CAPTIONER_THREADS": "1",
            "CAPTIONER_WORKERS": workers,
            "CAPTIONER_REQUEST_TIMEOUT_S": "600",
        },
    )
    assert caption(server.base, 12).status_code == 200
    assert httpx.get(server.base + "/healthz", timeout=10).status_code == 200

    r = caption(server.base, 13)  # in the model when the worker dies: answered, not left to time out
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_worker_dead", r.text

    assert_dead(server)


def assert_dead(server) -> None:
    r = httpx.get(server.base + "/healthz", timeout=10)
    assert r.status_code == 503 and r.json()["error"]["code"] == "model_worker_dead"
    assert httpx.get(server.base + "/readyz", timeout=10).status_code == 503
    for _ in range(3):
        r = caption(server.base, 12)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_worker_dead", r.text
    assert "a model worker died" in server.log()


def test_a_worker_process_killed_outright_is_fatal_and_visible(start_server):
    server = start_server("--workers", "2")
    workers = children(server.pid)
    assert len(workers) == 2
    assert caption(server.base, 12).status_code == 200
    os.kill(workers[0], signal.SIGKILL)
    deadline = time.monotonic() + 10
    while httpx.get(server.base + "/healthz", timeout=10).status_code == 200 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert_dead(server)


def test_a_server_killed_outright_takes_its_worker_processes_with_it(start_server):
    server = start_server("--workers", "2")
    workers = children(server.pid)
    assert len(workers) == 2
    os.kill(server.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while not all(map(gone, workers)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(map(gone, workers))
