"""Admission before work, against the real server: images in flight are counted as their parts
begin, a full server refuses before reading a body (or as soon as the image that does not fit
begins), with a Retry-After from the queue and the measured throughput; form rules are enforced
while the body streams; a client that hangs up has its queued work dropped."""

import json

import httpx
import pytest

from api.admission import Admission

from .helpers import FORM_END, RawClient, form_part, metric, png, wait_until

pytestmark = pytest.mark.slow

IMAGE = png((40, 30))


def in_flight(server) -> float:
    return metric(server, "captioner_images_in_flight")


def stalled_upload(server, images: int) -> tuple[RawClient, bytes]:
    """A request whose `images` image parts have all begun, stopped just before its last bytes:
    it holds its admission for as long as the test likes. Returns the client and the rest."""
    body = b"".join(form_part("images", IMAGE, f"{i}.png") for i in range(images)) + form_part("method", b"greedy")
    body += FORM_END
    client = RawClient(server)
    client.send_head(len(body))
    cut = body.rindex(b"--", 0, body.rindex(b'name="method"')) - 2  # inside the last image's bytes
    client.send(body[:cut])
    return client, body[cut:]


def test_images_are_admitted_as_their_parts_begin_and_a_full_server_refuses_before_the_body(start_server):
    server = start_server("--queue-size", "4")
    first, first_rest = stalled_upload(server, 3)
    wait_until(lambda: in_flight(server) == 3, "3 images in flight")

    # Two more images do not fit (3 + 2 > 4): refused once the second begins, though only 2 requests are in
    r = httpx.post(server.base + "/v1/captions", files=[("images", (f"{i}.png", IMAGE)) for i in range(2)], timeout=60)
    assert r.status_code == 503 and r.json()["error"]["code"] == "overloaded", r.text
    assert int(r.headers["retry-after"]) >= 1
    wait_until(lambda: in_flight(server) == 3, "the refused request's image let go")

    second, second_rest = stalled_upload(server, 1)
    wait_until(lambda: in_flight(server) == 4, "4 images in flight: full")

    # Full: refused from its head alone; not a byte of its body is sent, none is waited for
    refused = RawClient(server)
    refused.send_head(1_000_000)
    status, headers, body = refused.response()
    assert status == 503 and json.loads(body)["error"]["code"] == "overloaded"
    assert int(headers["retry-after"]) >= 1 and headers["connection"] == "close"
    assert refused.closed_by_server()

    for client, rest, count in ((first, first_rest, 3), (second, second_rest, 1)):
        client.send(rest)
        status, _, body = client.response()
        assert status == 200 and len(json.loads(body)["results"]) == count
        client.close()
    wait_until(lambda: in_flight(server) == 0, "every image let go")


def test_retry_after_follows_the_queue_and_the_measured_throughput():
    admission = Admission(capacity=100)
    admission.in_flight = 40
    for _ in range(50):  # the model takes 0.5 s per image, measured
        admission.record(images=8, seconds=4.0)
    assert admission.retry_after() == 21  # 41 images (those in flight and one more) x 0.5 s
    admission.in_flight = 10
    assert admission.retry_after() == 6
    for _ in range(50):  # a faster machine: 0.1 s per image
        admission.record(images=10, seconds=1.0)
    assert admission.retry_after() == 2  # 11 x 0.1 s
    admission.in_flight = 0
    assert admission.retry_after() == 1  # at least a second
    admission.in_flight = 10_000
    assert admission.retry_after() == 60  # at most a minute


@pytest.fixture
def small_server(start_server):
    return start_server("--max-bytes", "100000", "--max-images", "2")


def refused_mid_body(server, head_length: int, sent: bytes) -> tuple[int, dict, dict]:
    """Send a head declaring `head_length` bytes and only `sent` of them: the answer must come anyway."""
    client = RawClient(server)
    client.send_head(head_length)
    client.send(sent)
    status, headers, body = client.response()
    assert client.closed_by_server()
    client.close()
    return status, headers, json.loads(body)["error"]


def test_a_file_over_max_bytes_is_refused_while_it_streams(small_server):
    sent = form_part("images", b"x" * 150_000, "big.png")[:-2]
    status, headers, error = refused_mid_body(small_server, 250_000, sent)
    assert status == 413 and error["code"] == "too_large" and error["file"] == "big.png"
    assert headers["connection"] == "close"


def test_one_file_too_many_is_refused_as_its_part_begins(small_server):
    sent = form_part("images", IMAGE, "a.png") + form_part("images", IMAGE, "b.png")
    sent += form_part("images", b"", "c.png")[:-2]  # the third part's head, none of its bytes
    status, _, error = refused_mid_body(small_server, 200_000, sent)
    assert status == 422 and error["code"] == "too_many_files"


def test_an_unknown_field_is_refused_as_its_part_begins(small_server):
    sent = form_part("images", IMAGE, "a.png") + form_part("beam_sise", b"")[:-2]
    status, _, error = refused_mid_body(small_server, 200_000, sent)
    assert status == 422 and error["option"] == "beam_sise"


def test_a_client_that_hangs_up_has_its_queued_work_dropped(start_server):
    """The first request waits in the model worker's 3 s gathering window, and its client hangs up:
    its image is let go at once and never captioned; the next client's is."""
    server = start_server("--max-wait-ms", "3000")
    body = form_part("images", IMAGE, "gone.png") + form_part("method", b"greedy") + FORM_END
    gone = RawClient(server)
    gone.send_head(len(body))
    gone.send(body)
    wait_until(lambda: in_flight(server) == 1, "the image admitted")
    gone.close()
    wait_until(lambda: in_flight(server) == 0, "the gone client's image let go")

    r = httpx.post(
        server.base + "/v1/captions", files=[("images", ("next.png", IMAGE))], data={"method": "greedy"}, timeout=60
    )
    assert r.status_code == 200 and r.json()["results"][0]["file"] == "next.png"
    wait_until(lambda: metric(server, "captioner_abandoned_images_total") == 1, "the gone image passed by")
    assert metric(server, "captioner_images_total") == 1  # only the next client's image met the model
