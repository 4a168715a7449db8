"""The real server: `captioner serve` in its own process, under concurrent load, then SIGTERM.

Loopback only; every loop is bounded in count and time.
"""

import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from captioner.decoding import DecodeOptions
from captioner.predictor import Predictor

from .helpers import free_port, png, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def server(request, tiny_checkpoint, tmp_path):
    """(base URL, process, log) of `captioner serve`; a batch waits `request.param` ms (400) for more."""
    max_wait_ms = getattr(request, "param", "400")
    port = free_port()
    log = open(tmp_path / "server.log", "w+")  # noqa: SIM115 - the server writes it; closed in finally
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "cli",
            "serve",
            "--checkpoint",
            str(tiny_checkpoint),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--max-batch-size",
            "16",
            "--max-wait-ms",
            max_wait_ms,
            "--threads",
            "2",
            "--timeout-graceful-shutdown",
            "20",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the server exited:\n{log_text(log)}"
            try:
                if httpx.get(base + "/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail(f"the server was not ready within 60 s:\n{log_text(log)}")
        yield base, process, log
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)
        log.close()


def log_text(log) -> str:
    log.flush()
    log.seek(0)
    return log.read()[-4000:]


def metrics(base: str) -> dict[tuple[str, str | None], float]:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {(s.name, s.labels.get("le")): s.value for f in text_string_to_metric_families(text) for s in f.samples}


def batch_sizes(base: str) -> tuple[float, float]:
    """(number of model calls, number of calls with one image) from /metrics."""
    values = metrics(base)
    return values[("captioner_batch_size_count", None)], values[("captioner_batch_size_bucket", "1.0")]


# A batch waits for more until it holds 16 images, or for 10 s (the most the settings allow): the
# 16 requests sent at once make one batch unless the server takes seconds to read each.
@pytest.mark.parametrize("server", ["10000"], indirect=True)
def test_concurrent_requests_are_answered_right_and_batched(server, tiny_checkpoint):
    base, _process, _log = server
    sizes = [(40 + 7 * i, 90 - 3 * i) for i in range(16)]
    pictures = [png(size, background=(20 + 10 * i, 170, 200 - 10 * i)) for i, size in enumerate(sizes)]
    predictor = Predictor.from_checkpoint(tiny_checkpoint)
    expected = predictor.caption(pictures, DecodeOptions(method="greedy", max_length=12))

    with httpx.Client(base_url=base, timeout=60, limits=httpx.Limits(max_connections=32)) as client:

        def send(i):
            r = client.post(
                "/v1/captions",
                files=[("images", (f"p{i}.png", pictures[i], "image/png"))],
                data={"method": "greedy", "max_length": "12"},
            )
            return i, r

        with ThreadPoolExecutor(16) as pool:
            answers = list(pool.map(send, range(16)))

    for i, r in answers:
        assert r.status_code == 200, r.text
        (result,) = r.json()["results"]
        assert result["file"] == f"p{i}.png"
        assert (result["width"], result["height"]) == sizes[i]
        assert result["captions"][0]["tokens"] == expected[i]["captions"][0]["tokens"]
    calls, singles = batch_sizes(base)
    assert calls < 16 and singles < calls, f"no batch held more than one image ({calls} calls)"


def test_sigterm_lets_the_request_in_flight_finish(server):
    """SIGTERM arrives while a request is still uploading; it must still be answered in full."""
    base, process, log = server
    head = (
        b'--B\r\nContent-Disposition: form-data; name="images"; filename="late.png"\r\nContent-Type: image/png\r\n\r\n'
    )
    tail = b'\r\n--B\r\nContent-Disposition: form-data; name="method"\r\n\r\ngreedy\r\n--B--\r\n'
    picture = png()
    uploading, signalled = threading.Event(), threading.Event()
    answer = {}

    def body():
        yield head + picture[:100]
        uploading.set()
        signalled.wait(30)  # the rest is sent once the server is shutting down
        yield picture[100:] + tail

    def send():
        try:
            answer["r"] = httpx.post(
                base + "/v1/captions",
                content=body(),
                timeout=60,
                headers={"content-type": "multipart/form-data; boundary=B"},
            )
        except httpx.HTTPError as e:
            answer["error"] = e

    thread = threading.Thread(target=send)
    thread.start()
    assert uploading.wait(30)
    in_flight = ("captioner_images_in_flight", None)
    wait_until(lambda: metrics(base)[in_flight] == 1, "the server admitting the upload")  # the request is in flight
    process.send_signal(signal.SIGTERM)
    # Read through a file of its own: log_text's seek would move the running server's write offset.
    wait_until(lambda: "Shutting down" in Path(log.name).read_text(), "the server shutting down")
    signalled.set()
    thread.join(60)
    assert "error" not in answer, f"{answer.get('error')!r}\n{log_text(log)}"
    assert answer["r"].status_code == 200, answer["r"].text
    assert answer["r"].json()["results"][0]["file"] == "late.png"
    # uvicorn re-raises the signal once it has shut down cleanly, so "killed by SIGTERM" is a clean exit
    assert process.wait(30) in (0, -signal.SIGTERM), log_text(log)
    output = log_text(log)
    assert "model workers stopped" in output and "Application shutdown complete" in output
    with pytest.raises(httpx.TransportError):
        httpx.get(base + "/healthz", timeout=2)
