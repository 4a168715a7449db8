"""Clients refused before their body has all arrived, against the real `captioner serve`: each gets
its answer, however it sends (http.client and requests send the whole body before they read,
curl waits for 100 Continue), with either of uvicorn's parsers; and the lingering close that makes
this so is bounded by the body's own limits. Every wait here is bounded (socket timeouts, counted
loops, wait_until on what the server does)."""

import http.client
import json
import subprocess

import pytest
import requests

from .helpers import BOUNDARY, FORM_END, RawClient, ServerProcess, form_part, serve_command, wait_until

pytestmark = pytest.mark.slow

BIG_FILE = 60 * 2**20  # over max_bytes (10 MiB), within the body's limit (16 x 10 MiB)
LINGER_CUT = "stopped reading a refused request's body"
KEY = {"X-API-Key": "secret"}
PARSERS = ["httptools", "h11"]


def serve(tiny_checkpoint, tmp_path_factory, *flags: str):
    argv = serve_command(tiny_checkpoint, "--workers", "1", *flags)
    return ServerProcess(argv, tmp_path_factory.mktemp("log") / "server.log", env={"CAPTIONER_API_KEY": "secret"})


@pytest.fixture(scope="module", params=PARSERS)
def server(request, tiny_checkpoint, tmp_path_factory):
    """The server as it runs by default, with a key, and either parser."""
    with serve(tiny_checkpoint, tmp_path_factory, "--http", request.param) as s:
        yield s


def multipart(*parts: bytes, key: bool = True) -> tuple[bytes, dict[str, str]]:
    headers = {"Content-Type": f"multipart/form-data; boundary={BOUNDARY}", **(KEY if key else {})}
    return b"".join(parts) + FORM_END, headers


def post_whole(server, body: bytes, headers: dict[str, str]) -> tuple[int, dict]:
    """POST /v1/captions with http.client, which sends the whole body before it reads a byte."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    try:
        connection.request("POST", "/v1/captions", body=body, headers=headers)
        answer = connection.getresponse()
        return answer.status, json.loads(answer.read())["error"]
    finally:
        connection.close()


def test_http_client_gets_its_413_for_a_60_mb_upload_every_time(server):
    """The file is refused after 10 MiB; the 50 MiB the client sends after the answer are read and
    thrown away, so the answer is not lost to a reset."""
    body, headers = multipart(form_part("images", bytes(BIG_FILE), "big.png"))
    for _ in range(20):
        status, error = post_whole(server, body, headers)
        assert status == 413 and error["code"] == "too_large" and error["file"] == "big.png"


def test_http_client_gets_its_answer_for_100_files(server):
    body, headers = multipart(*(form_part("images", bytes(64 * 1024), f"{i}.png") for i in range(100)))
    status, error = post_whole(server, body, headers)
    assert status == 422 and error["code"] == "too_many_files"


def test_requests_gets_its_413_for_a_60_mb_upload(server):
    files = {"images": ("big.png", bytes(BIG_FILE), "image/png")}
    r = requests.post(server.base + "/v1/captions", files=files, headers=KEY, timeout=60)
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_curl_waiting_for_100_continue_gets_its_413_without_sending_the_body(server, tmp_path):
    """The body's declared length is over the limit: refused from the head, so no 100 Continue."""
    big = tmp_path / "big.png"
    with big.open("wb") as f:
        f.truncate(200 * 2**20)  # sparse: over the body's limit (160 MiB), and no 200 MB written
    answer = tmp_path / "answer.json"
    r = subprocess.run(
        ["curl", "-sS", "-o", str(answer), "-w", "%{http_code} %{size_upload}"]
        + ["-H", "Expect: 100-continue", "-H", "X-API-Key: secret"]
        + ["-F", f"images=@{big};type=image/png", server.base + "/v1/captions"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 0, r.stderr
    status, uploaded = r.stdout.split()
    assert status == "413" and float(uploaded) == 0  # not a byte of the body sent
    assert json.loads(answer.read_text())["error"]["code"] == "too_large"


def test_http_client_without_the_key_gets_its_401_for_a_60_mb_upload(server):
    body, headers = multipart(form_part("images", bytes(BIG_FILE), "big.png"), key=False)
    status, error = post_whole(server, body, headers)
    assert status == 401 and error["code"] == "unauthorized"


@pytest.fixture(scope="module", params=PARSERS)
def bounded_server(request, tiny_checkpoint, tmp_path_factory):
    """A body may be 66,560 bytes (1 KiB of file, 64 KiB of form) and take 3 s from its head: a
    client sending as fast as it can reaches the first bound long before the second, and a client
    sending a byte at a time the second long before the first."""
    flags = ("--max-images", "1", "--max-bytes", "1024", "--body-timeout-s", "3", "--http", request.param)
    with serve(tiny_checkpoint, tmp_path_factory, *flags) as s:
        yield s


def refused_from_the_head(server) -> RawClient:
    """A client whose head declares 1 GB: it reads its 413 (the connection half-closed after it)
    and goes on sending."""
    client = RawClient(server, timeout=30)
    client.send_head(2**30, headers=KEY)
    status, headers, body = client.response()
    assert status == 413 and headers["connection"] == "close" and json.loads(body)["error"]["code"] == "too_large"
    return client


def cut_off(client: RawClient, data: bytes) -> bool:
    """Send `data`; True if the server has closed the connection (a reset, or a broken pipe)."""
    try:
        client.send(data)
    except (BrokenPipeError, ConnectionResetError):
        return True
    return False


def test_a_client_that_keeps_sending_is_cut_off_past_the_body_limit(bounded_server):
    server = bounded_server
    client = refused_from_the_head(server)
    chunk, sent = bytes(64 * 1024), 0
    while not cut_off(client, chunk):
        sent += len(chunk)
        assert sent < 64 * 2**20, "the server read 64 MiB past its answer"
    wait_until(
        lambda: f"{LINGER_CUT} at " in server.log() and "over the limit of 66560" in server.log(), "the cut-off logged"
    )
    client.close()


def test_a_client_that_trickles_is_cut_off_at_the_body_deadline(bounded_server):
    server = bounded_server
    client = refused_from_the_head(server)
    # A byte each poll, a few dozen in all: far under the byte limit.
    wait_until(lambda: cut_off(client, b"x"), "the lingering connection closed at the body's deadline")
    wait_until(lambda: f"{LINGER_CUT} at its deadline" in server.log(), "the cut-off logged, at the deadline")
    client.close()
