"""Clients that trickle, against the real `captioner serve` over plain sockets: a request's head
and body each have a deadline, and a connection that misses one is closed; the server keeps
answering everyone else meanwhile. Every wait here is bounded (socket timeouts, counted loops)."""

import json
import socket
import time

import httpx
import pytest

from .helpers import RawClient, form_part, png

pytestmark = pytest.mark.slow

IMAGE = png((40, 30))


def serve(checkpoint, log_folder, parser: str):
    from .helpers import ServerProcess, serve_command

    flags = ("--header-timeout-s", "2", "--body-timeout-s", "3", "--timeout-keep-alive", "30", "--http", parser)
    return ServerProcess(serve_command(checkpoint, *flags), log_folder / "server.log")


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """The server as it runs by default: HTTP parsed by httptools."""
    with serve(tiny_checkpoint, tmp_path_factory.mktemp("log"), "httptools") as s:
        yield s


@pytest.fixture(scope="module", params=["httptools", "h11"])
def head_server(request, server, tiny_checkpoint, tmp_path_factory):
    """The server with either of uvicorn's parsers: each gets the head's deadline and size limit its own way."""
    if request.param == "httptools":
        yield server
        return
    with serve(tiny_checkpoint, tmp_path_factory.mktemp("log"), request.param) as s:
        yield s


def trickle(client: RawClient, data: bytes, pause: float = 0.25) -> bool:
    """Send `data` a byte at a time; False as soon as the server has closed the connection."""
    for byte in data:
        try:
            client.send(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            return False
        time.sleep(pause)
    return True


def test_a_head_sent_a_byte_at_a_time_is_cut_off(head_server):
    client = RawClient(head_server, timeout=30)
    head = b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n"
    assert not trickle(client, head), "the server read a whole 50-second head"
    assert client.closed_by_server()


def test_a_connection_that_sends_nothing_is_closed(head_server):
    client = RawClient(head_server, timeout=30)
    assert client.closed_by_server()


def test_the_next_head_on_a_kept_alive_connection_has_its_deadline_too(head_server):
    client = RawClient(head_server, timeout=30)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    status, _, _ = client.response()
    assert status == 200
    assert not trickle(client, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 200 + b"\r\n\r\n")


@pytest.mark.parametrize("pace", ["trickle", "stall"])
def test_a_body_that_misses_its_deadline_is_408_and_the_connection_closed(server, pace):
    body = form_part("images", IMAGE, "slow.png") + form_part("method", b"greedy")
    client = RawClient(server, timeout=30)
    client.send_head(len(body) + 100)  # declared longer than what will ever come
    client.send(body[:200])
    if pace == "trickle":
        trickle(client, body[200:400], pause=0.1)  # 20 s of body: over the 3 s deadline
    status, headers, answer = client.response()
    assert status == 408 and json.loads(answer)["error"]["code"] == "body_timeout"
    assert headers["connection"] == "close"
    assert client.closed_by_server()


def test_slow_clients_do_not_hold_up_the_others(server):
    slow = []
    for _ in range(8):
        client = RawClient(server, timeout=30)
        client.send(b"POST /v1/captions HTTP/1.1\r\nHost: 127.0.0.1\r\n")  # and nothing more
        slow.append(client)
    r = httpx.post(
        server.base + "/v1/captions",
        files=[("images", ("a.png", IMAGE, "image/png"))],
        data={"method": "greedy"},
        timeout=30,
    )
    assert r.status_code == 200
    for client in slow:
        assert client.closed_by_server()


def test_an_unfinished_head_over_16_kb_is_refused(head_server):
    """What the server buffers of a head it has not seen the end of is bounded."""
    client = RawClient(head_server, timeout=30)
    client.send(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: " + b"a" * 20_000)
    status, _, _ = client.response()
    assert status == 400
    assert client.closed_by_server()


def test_connections_over_limit_concurrency_are_refused_until_slow_ones_are_cut(start_server):
    server = start_server("--limit-concurrency", "3", "--header-timeout-s", "2")
    idle = [socket.create_connection(("127.0.0.1", server.port), timeout=30) for _ in range(3)]
    r = httpx.get(server.base + "/healthz", timeout=30)
    assert r.status_code == 503  # uvicorn's own answer: 3 connections are all it takes
    for s in idle:
        assert s.recv(1) == b""  # cut at their head deadline
        s.close()
    assert httpx.get(server.base + "/healthz", timeout=30).status_code == 200
