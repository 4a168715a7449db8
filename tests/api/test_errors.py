"""Every bad input gets a JSON error with a stable code and the right status; never a 500."""

import io
import threading
import time

import pytest
from PIL import Image

from .helpers import encode, picture, png, upload


def error_of(response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code, error
    assert error["message"]
    return error


def bomb_png(side: int = 20000) -> bytes:
    """A 1-bit PNG of side x side: a few kilobytes that would decode to side**2 pixels."""
    buffer = io.BytesIO()
    Image.new("1", (side, side)).save(buffer, "PNG")
    return buffer.getvalue()


def test_a_file_over_max_bytes_is_413_too_large(make_client):
    client = make_client(max_bytes=2000, max_images=4)
    error = error_of(
        client.post("/v1/captions", files=upload(("ok.png", png((8, 8))), ("big.bmp", encode(picture(), "BMP")))),
        413,
        "too_large",
    )
    assert error["file"] == "big.bmp"


def test_a_body_over_the_limit_is_refused_from_its_content_length(make_client):
    client = make_client(max_bytes=1000, max_images=1)
    r = client.post("/v1/captions", content=b"x" * 200_000, headers={"content-type": "multipart/form-data; boundary=b"})
    error_of(r, 413, "too_large")


def test_a_chunked_body_over_the_limit_is_cut_off_while_reading(make_client):
    client = make_client(max_bytes=1000, max_images=1)

    def chunks():
        yield b'--b\r\nContent-Disposition: form-data; name="images"; filename="a.png"\r\n\r\n'
        for _ in range(100):
            yield b"x" * 10_000

    r = client.post("/v1/captions", content=chunks(), headers={"content-type": "multipart/form-data; boundary=b"})
    error_of(r, 413, "too_large")


def test_a_decompression_bomb_is_413_too_many_pixels_from_its_header(client):
    data = bomb_png()
    assert len(data) < 100_000  # 400 million pixels in a few kilobytes
    error = error_of(client.post("/v1/captions", files=upload(("bomb.png", data))), 413, "too_many_pixels")
    assert error["file"] == "bomb.png" and "pixels" in error["message"]


def test_the_pixel_limit_is_a_setting(make_client):
    client = make_client(max_pixels=50 * 50)
    error_of(client.post("/v1/captions", files=upload(("a.png", png((60, 60))))), 413, "too_many_pixels")
    assert client.post("/v1/captions", files=upload(("a.png", png((50, 50))))).status_code == 200


def test_too_many_files_is_422_naming_images(make_client):
    """Outside the schema (maxItems), as the OpenAPI responses document it: no large body (413)."""
    client = make_client(max_images=2)
    r = client.post("/v1/captions", files=upload(*[(f"{i}.png", png((8, 8))) for i in range(3)]))
    assert error_of(r, 422, "too_many_files")["option"] == "images"


@pytest.mark.parametrize(
    "name, data",
    [
        ("notes.txt", b"just some text, not a picture\n" * 10),
        ("picture.tiff", encode(picture(), "TIFF")),
        ("empty.png", b""),
    ],
)
def test_a_file_that_is_not_an_accepted_image_is_415(client, name, data):
    error = error_of(client.post("/v1/captions", files=upload((name, data))), 415, "unsupported_format")
    assert error["file"] == name and name in error["message"]


def test_a_corrupt_image_is_422_corrupt_image(client):
    truncated = png((200, 200))[:300]
    error = error_of(client.post("/v1/captions", files=upload(("cut.png", truncated))), 422, "corrupt_image")
    assert error["file"] == "cut.png"


@pytest.mark.parametrize(
    "options, option",
    [
        ({"beam_size": "11"}, "beam_size"),
        ({"beam_size": "0"}, "beam_size"),
        ({"num_captions": "4", "beam_size": "3"}, "num_captions"),
        ({"method": "greedy", "num_captions": "2"}, "num_captions"),
        ({"method": "nucleus"}, "method"),
        ({"method": "sample", "temperature": "0"}, "temperature"),
        ({"method": "sample", "top_k": "-1"}, "top_k"),
        ({"max_length": "51"}, "max_length"),
        ({"max_length": "many"}, "max_length"),
        ({"length_penalty": "3"}, "length_penalty"),
        ({"seed": "-5"}, "seed"),
        ({"overlays": "perhaps"}, "overlays"),
    ],
)
def test_an_option_out_of_range_is_422_naming_it(client, options, option):
    error = error_of(client.post("/v1/captions", files=upload(("a.png", png())), data=options), 422, "invalid_option")
    assert error["option"] == option
    assert option in error["message"]


def test_no_image_is_422_missing_image(client):
    error_of(client.post("/v1/captions", data={"method": "beam"}), 422, "missing_image")


def test_unknown_routes_and_methods_are_json_errors(client):
    error_of(client.get("/v1/nothing"), 404, "not_found")
    error_of(client.get("/v1/captions"), 405, "method_not_allowed")
    error_of(client.delete("/v1/model"), 405, "method_not_allowed")


def test_the_server_keeps_serving_after_bad_input(client):
    bad = [("a.txt", b"text"), ("b.png", bomb_png()), ("c.png", png()[:100]), ("d.tiff", encode(picture(), "TIFF"))]
    for name, data in bad:
        assert 400 <= client.post("/v1/captions", files=upload((name, data))).status_code < 500
    assert client.post("/v1/captions", data={"beam_size": "99"}).status_code == 422
    r = client.post("/v1/captions", files=upload(("good.png", png())))
    assert r.status_code == 200 and r.json()["results"][0]["captions"]
    assert client.get("/readyz").status_code == 200


def test_api_key_guards_all_but_the_probes_the_page_and_the_api_description(make_client):
    client = make_client(api_key="s3cret")
    error_of(client.get("/v1/model"), 401, "unauthorized")
    error_of(client.get("/v1/model", headers={"X-API-Key": "wrong"}), 401, "unauthorized")
    error_of(client.post("/v1/captions", files=upload(("a.png", png()))), 401, "unauthorized")
    error_of(client.get("/metrics"), 401, "unauthorized")
    error_of(client.get("/no/such/page"), 401, "unauthorized")  # unknown paths are not public either
    assert client.get("/v1/model", headers={"X-API-Key": "s3cret"}).status_code == 200
    r = client.post("/v1/captions", files=upload(("a.png", png())), headers={"X-API-Key": "s3cret"})
    assert r.status_code == 200, r.text
    for path in ("/healthz", "/readyz", "/", "/static/app.js", "/docs", "/openapi.json"):
        assert client.get(path).status_code == 200, path
    assert make_client(api_key="s3cret", public_metrics=True).get("/metrics").status_code == 200


def test_keys_are_compared_as_digests_of_one_length(make_client, monkeypatch):
    """hmac.compare_digest takes as long for any two inputs of one length: so keys of any length
    are compared as SHA-256 digests, and the time a wrong key takes tells nothing of the right one."""
    import api.guard

    compared = []
    real = api.guard.hmac.compare_digest
    monkeypatch.setattr(api.guard.hmac, "compare_digest", lambda a, b: compared.append((len(a), len(b))) or real(a, b))
    client = make_client(api_key="s3cret")
    for key in ("", "s", "s3cre", "s3cret", "s3cret-and-more" * 10):
        client.get("/v1/model", headers={"X-API-Key": key})
    assert compared == [(32, 32)] * 5


def test_cors_origins_setting_allows_preflight_from_those_origins(make_client):
    client = make_client(cors_origins="http://good.example", api_key="k")
    headers = {
        "Origin": "http://good.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "x-api-key",
    }
    r = client.options("/v1/captions", headers=headers)
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == "http://good.example"
    r = client.options("/v1/captions", headers={**headers, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in r.headers


def gate_the_model(client) -> tuple[threading.Event, threading.Event]:
    """Make the model worker wait, once inside a model call (`entered`), until `gate` is set. The
    client's worker must be the thread kind (workers=1), whose calls these events can see."""
    predictor = client.app.state.predictor
    gate, entered = threading.Event(), threading.Event()
    original = predictor.caption_batch

    def slow(images, options):
        entered.set()
        gate.wait(30)
        return original(images, options)

    predictor.caption_batch = slow
    return gate, entered


def test_a_full_server_is_503_with_retry_after_at_once(make_client):
    client = make_client(queue_size=2, max_batch_size=1, max_wait_ms=0, workers=1)  # two images in flight at most
    gate, entered = gate_the_model(client)
    answers = {}

    def send(name):
        answers[name] = client.post("/v1/captions", files=upload((f"{name}.png", png())), data={"method": "greedy"})

    first = threading.Thread(target=send, args=("first",))
    first.start()
    assert entered.wait(30), "the first request never reached the model"
    second = threading.Thread(target=send, args=("second",))
    second.start()
    deadline = time.monotonic() + 30  # until the second is admitted (it waits in the queue)
    while not client.app.state.admission.full and time.monotonic() < deadline:
        time.sleep(0.01)
    assert client.app.state.admission.full
    third = client.post("/v1/captions", files=upload(("third.png", png())), data={"method": "greedy"})
    assert not gate.is_set()  # answered while the model was still busy: the request never waited for it
    error_of(third, 503, "overloaded")
    assert int(third.headers["retry-after"]) >= 1
    gate.set()
    first.join(30)
    second.join(30)
    assert answers["first"].status_code == 200 and answers["second"].status_code == 200


def test_a_request_the_model_does_not_answer_in_time_is_504(make_client):
    client = make_client(request_timeout_s=2.0, workers=1)
    gate, _ = gate_the_model(client)
    quick = {"method": "greedy", "max_length": "3"}
    try:
        error_of(client.post("/v1/captions", files=upload(("a.png", png())), data=quick), 504, "timeout")
    finally:
        gate.set()
    r = client.post("/v1/captions", files=upload(("a.png", png())), data=quick)
    assert r.status_code == 200, r.text
