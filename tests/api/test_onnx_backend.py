"""The server on the ONNX Runtime backend, as a real process: forked workers each make their own
session and caption as torch does; the model card and the start-up log say which backend runs;
a damaged graph stops the start-up with one line and status 2, before any worker exists."""

import concurrent.futures
import functools

import httpx
import pytest
from safetensors import safe_open

from tests.conftest import assert_same_captions

from .helpers import png, upload

pytestmark = pytest.mark.slow


def caption(base: str, size: tuple[int, int]) -> dict:
    r = httpx.post(
        base + "/v1/captions",
        files=upload(("a.png", png(size))),
        data={"method": "beam", "beam_size": "3", "attention": "true"},
        timeout=60,
    )
    assert r.status_code == 200, r.text
    return r.json()["results"][0]


def test_forked_workers_caption_on_onnxruntime_as_torch_does(start_server, tiny_onnx_checkpoint):
    sizes = [(64 + 8 * i, 64 + 4 * i) for i in range(12)]
    answers = {}
    for backend in ("onnxruntime", "torch"):
        server = start_server("--workers", "2", "--threads", "2", "--backend", backend, checkpoint=tiny_onnx_checkpoint)
        card = httpx.get(server.base + "/v1/model").json()
        expected = {"onnxruntime": {"backend": "onnxruntime", "precision": "fp32", "device": "cpu"}}
        assert card["runtime"] == expected.get(backend, {"backend": "torch", "precision": "fp32", "device": "cpu"})
        assert f"on {card['runtime']['backend']}, fp32" in server.log()
        with concurrent.futures.ThreadPoolExecutor(6) as pool:  # both workers busy at once
            answers[backend] = list(pool.map(functools.partial(caption, server.base), sizes))
        server.stop()
    assert_same_captions(answers["onnxruntime"], answers["torch"])


def test_a_damaged_graph_stops_the_start_up_with_one_line(start_server, tiny_onnx_checkpoint, tmp_path):
    with safe_open(str(tiny_onnx_checkpoint), framework="pt") as f:
        graph = f.get_tensor("onnx_encoder").numpy().tobytes()
    data = bytearray(tiny_onnx_checkpoint.read_bytes())
    data[bytes(data).find(graph[-64:]) + 10] ^= 0xFF  # one byte of the graph flipped
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(bytes(data))
    with pytest.raises(RuntimeError, match=r"the server exited \(2\)") as refused:
        start_server("--workers", "2", checkpoint=damaged)
    assert f"exiting with status 2: cannot serve {damaged}" in str(refused.value)
    assert "Traceback" not in str(refused.value)
