"""Memory and answer size, budgeted before the work, against the real server: a 16-bit picture
costs what its budget says, a picture over the decode budget or an answer over the response
budget is refused naming the limit, RLE BMP is refused."""

import concurrent.futures
import io
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

from api.routers import captions
from api.schemas import CaptionOptions
from runtime.children import child_processes as children
from tests.captioner.test_images import rle8_bmp

from .helpers import png, upload

pytestmark = pytest.mark.slow

MiB = 1024 * 1024


def deep_png(side: int = 6300) -> bytes:
    """A 16-bit grayscale PNG of side x side pixels in about 80 KB (the issue's picture)."""
    a = np.zeros((side, side), np.uint16)
    a[side // 6 : side // 3, side // 6 : side // 2] = 40000
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, "PNG")
    return buffer.getvalue()


def peak_rss(pid: int) -> int:
    """The peak resident sizes (VmHWM) of the server and its worker processes, summed, in bytes."""
    pids = [pid, *children(pid)]
    peaks = [
        int(line.split()[1]) * 1024
        for p in pids
        for line in Path(f"/proc/{p}/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    ]
    assert len(peaks) == len(pids)
    return sum(peaks)


def test_concurrent_16_bit_pictures_stay_within_the_decode_budget(start_server):
    """4 requests at once of 2 such pictures each, decoded one at a time by each of 2 worker
    processes: the server's peak grows by about 2 x 400 MB (10 bytes a pixel each). Float64 copies
    made it 26 bytes a pixel: 6 requests of 4 grew it by 2.5 GB."""
    server = start_server("--workers", "2")
    data = deep_png()
    before = peak_rss(server.pid)

    def send(i):
        return httpx.post(
            server.base + "/v1/captions",
            files=upload((f"{i}a.png", data), (f"{i}b.png", data)),
            data={"method": "greedy", "max_length": "3"},
            timeout=300,
        )

    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(send, range(4)))
    assert [r.status_code for r in answers] == [200] * 4, answers[0].text
    grown = peak_rss(server.pid) - before
    budget = 2 * 6300 * 6300 * 10  # two decodes at a time, one in each worker
    assert grown < budget * 1.25 + 150 * MiB, f"peak grew by {grown / MiB:.0f} MiB"


def test_a_picture_over_the_decode_budget_is_413_before_it_is_decoded(start_server):
    server = start_server("--max-decode-bytes", str(100 * MiB))
    r = httpx.post(server.base + "/v1/captions", files=upload(("deep.png", deep_png())), timeout=120)
    assert r.status_code == 413, r.text
    error = r.json()["error"]
    assert error["code"] == "too_much_memory" and error["file"] == "deep.png" and "MiB" in error["message"]
    assert httpx.get(server.base + "/v1/model", timeout=30).json()["limits"]["max_decode_bytes"] == 100 * MiB


def test_rle_bmp_is_415_and_a_plain_bmp_is_captioned(start_server):
    server = start_server()
    r = httpx.post(server.base + "/v1/captions", files=upload(("rle.bmp", rle8_bmp(300, 40))), timeout=60)
    assert r.status_code == 415 and "RLE" in r.json()["error"]["message"], r.text
    plain = io.BytesIO()
    Image.new("P", (300, 40)).save(plain, "BMP")
    assert (
        httpx.post(server.base + "/v1/captions", files=upload(("plain.bmp", plain.getvalue())), timeout=60).status_code
        == 200
    )


@pytest.fixture(scope="module")
def budget_server(tiny_checkpoint, tmp_path_factory):
    from .helpers import ServerProcess, serve_command

    with ServerProcess(
        serve_command(tiny_checkpoint, "--max-response-bytes", str(2 * MiB), "--overlay-size", "64"),
        tmp_path_factory.mktemp("log") / "server.log",
    ) as server:
        yield server


@pytest.mark.parametrize(
    "fields, images, knob",
    [
        ({"overlays": "true", "beam_size": "10", "num_captions": "10", "max_length": "50"}, 2, "overlays"),
        ({"attention": "true", "beam_size": "10", "num_captions": "10", "max_length": "50"}, 8, "attention"),
    ],
)
def test_an_answer_over_the_response_budget_is_422_naming_the_knob(budget_server, fields, images, knob):
    files = upload(*[(f"{i}.png", png((8, 8))) for i in range(images)])
    r = httpx.post(budget_server.base + "/v1/captions", files=files, data=fields, timeout=120)
    assert r.status_code == 422, r.text
    error = r.json()["error"]
    assert error["code"] == "response_too_large" and error["option"] == knob and knob in error["message"]


def test_plain_captions_name_num_captions_or_max_length(make_client):
    client = make_client(max_response_bytes=100_000)
    files = upload(*[(f"{i}.png", png((8, 8))) for i in range(16)])
    r = client.post("/v1/captions", files=files, data={"method": "sample", "num_captions": "10", "max_length": "50"})
    assert r.status_code == 422 and r.json()["error"]["option"] == "num_captions", r.text
    r = client.post("/v1/captions", files=files, data={"method": "greedy", "max_length": "50"})
    assert r.status_code == 200, r.text  # 16 x 50 words: well within
    client = make_client(max_response_bytes=20_000)
    r = client.post("/v1/captions", files=files, data={"method": "greedy", "max_length": "50"})
    assert r.status_code == 422 and r.json()["error"]["option"] == "max_length", r.text


@pytest.mark.parametrize(
    "fields",
    [
        {"overlays": "true", "num_captions": "3", "max_length": "20"},
        {"overlays": "true", "attention": "true", "method": "greedy", "max_length": "50"},
        {"attention": "true", "beam_size": "10", "num_captions": "10", "max_length": "30"},
        {"method": "sample", "num_captions": "10", "max_length": "50", "temperature": "10"},
    ],
)
def test_real_answers_never_exceed_their_estimate(budget_server, fields):
    r = httpx.post(
        budget_server.base + "/v1/captions", files=upload(("a.png", png((300, 300)))), data=fields, timeout=120
    )
    assert r.status_code == 200, r.text
    options = CaptionOptions.model_validate(fields)
    assert len(r.content) <= captions.response_bytes(options, 1, 8 * 8, 64)
