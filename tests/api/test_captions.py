"""POST /v1/captions: results, their order and shapes, attention and overlays."""

import asyncio
import base64
import io
import threading

import pytest
from PIL import Image

from .helpers import encode, picture, png, upload


def caption(client, *files, **options):
    return client.post("/v1/captions", files=upload(*files), data={k: str(v) for k, v in options.items()})


def test_one_image_gives_ranked_beam_captions(client):
    r = caption(client, ("shapes.png", png()), num_captions=3, beam_size=3)
    assert r.status_code == 200, r.text
    model, card = r.json()["model"], client.get("/v1/model").json()
    assert model["checkpoint"] == "tiny.safetensors" and model["encoder"] == "tiny"
    assert model == {k: card[k] for k in ("checkpoint", "encoder", "attention", "cell", "vocab_size", "attention_grid")}
    (result,) = r.json()["results"]
    assert result["file"] == "shapes.png"
    assert (result["width"], result["height"]) == (96, 80)
    assert result["method"] == "beam"
    assert result["attention_grid"] == [8, 8]
    captions = result["captions"]
    assert len(captions) == 3
    vocabulary = set(client.get("/v1/model").json()["vocabulary"])
    for c in captions:
        assert c["text"] == " ".join(c["tokens"])
        assert set(c["tokens"]) <= vocabulary
        assert c["log_prob"] <= 0
        assert "attention" not in c and "overlays" not in c  # only on request


def test_results_come_in_upload_order_with_their_file_names(client):
    files = [
        (f"{name}.png", png(size)) for name, size in (("wide", (120, 60)), ("tall", (50, 110)), ("square", (70, 70)))
    ]
    r = caption(client, *files, method="greedy")
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["file"] for x in results] == ["wide.png", "tall.png", "square.png"]
    assert [(x["width"], x["height"]) for x in results] == [(120, 60), (50, 110), (70, 70)]
    # each result is the image's own: captioned alone, an image gets the very same caption
    for name, data in files:
        alone = caption(client, (name, data), method="greedy").json()["results"][0]
        batched = next(x for x in results if x["file"] == name)
        assert alone["captions"][0]["tokens"] == batched["captions"][0]["tokens"]


def test_every_accepted_format_is_captioned(client):
    image = picture()
    files = [
        ("a.jpg", encode(image, "JPEG")),
        ("b.png", encode(image, "PNG")),
        ("c.webp", encode(image, "WEBP")),
        ("d.gif", encode(image, "GIF")),
        ("e.bmp", encode(image, "BMP")),
        ("f.png", encode(image.convert("RGBA"), "PNG")),
        ("g.png", encode(image.convert("L"), "PNG")),
    ]
    r = caption(client, *files, method="greedy")
    assert r.status_code == 200, r.text
    assert [x["file"] for x in r.json()["results"]] == [name for name, _ in files]


def test_attention_grids_have_the_model_grid_and_sum_to_one(client):
    r = caption(client, ("a.png", png()), attention="true", num_captions=2)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    h, w = result["attention_grid"]
    for c in result["captions"]:
        assert len(c["attention"]) == len(c["tokens"])
        for grid in c["attention"]:
            assert len(grid) == h and all(len(row) == w for row in grid)
            assert sum(map(sum, grid)) == pytest.approx(1.0, abs=1e-3)
            assert min(map(min, grid)) >= 0


def test_a_server_with_amp_captions_with_a_bfloat16_encoder(make_client):
    client = make_client(amp=True)
    assert client.app.state.predictor.amp
    r = caption(client, ("a.png", png()), attention="true")
    assert r.status_code == 200, r.text
    [best] = r.json()["results"][0]["captions"]
    assert best["tokens"] and len(best["attention"]) == len(best["tokens"])


def test_overlays_are_png_data_uris_one_per_word_over_a_bounded_picture(make_client):
    client = make_client(overlay_size=64)
    r = caption(client, ("big.png", png((300, 200))), overlays="true", method="greedy")
    assert r.status_code == 200, r.text
    c = r.json()["results"][0]["captions"][0]
    assert "attention" not in c  # overlays alone do not send the grids
    assert len(c["overlays"]) == len(c["tokens"]) > 0
    for uri in c["overlays"]:
        prefix = "data:image/png;base64,"
        assert uri.startswith(prefix)
        image = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix) :])))
        assert image.format == "PNG"
        assert image.size == (64, 43)  # the picture's aspect ratio, longest side overlay_size


def test_a_large_turned_photo_reports_its_full_upright_size_and_keeps_its_shape_in_overlays(make_client):
    """A JPEG is decoded at a reduced scale (only the model's and the overlays' pixels are needed),
    yet the result describes the user's picture: 1600x1200 stored, turned a quarter by EXIF."""
    exif = Image.Exif()
    exif[0x0112] = 6
    photo = encode(picture((1600, 1200)), "JPEG", quality=90, exif=exif)
    client = make_client(overlay_size=64)
    r = caption(client, ("photo.jpg", photo), overlays="true", method="greedy")
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    assert (result["width"], result["height"]) == (1200, 1600)
    uri = result["captions"][0]["overlays"][0]
    overlay = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
    assert overlay.size == (48, 64)


def test_greedy_gives_one_caption_and_sampling_with_a_seed_repeats(client):
    r = caption(client, ("a.png", png()), method="greedy")
    assert r.status_code == 200 and len(r.json()["results"][0]["captions"]) == 1
    options = dict(method="sample", num_captions=4, temperature=0.7, top_k=5, seed=11, max_length=8)
    first = caption(client, ("a.png", png()), **options)
    again = caption(client, ("a.png", png()), **options)
    assert first.status_code == 200, first.text
    assert len(first.json()["results"][0]["captions"]) == 4
    assert first.json() == again.json()
    for c in first.json()["results"][0]["captions"]:
        assert len(c["tokens"]) <= 8


def test_max_length_bounds_every_caption(client):
    r = caption(client, ("a.png", png()), max_length=3, num_captions=2)
    assert r.status_code == 200, r.text
    assert all(len(c["tokens"]) <= 3 for c in r.json()["results"][0]["captions"])


def test_images_are_decoded_and_captioned_off_the_event_loop_by_the_model_worker(make_client):
    """With one model worker, a thread of the server's whose calls this process sees: it reads
    the images and captions them; the event loop does neither. (Worker processes: test_workers.py.)"""
    client = make_client(workers=1)
    predictor = client.app.state.predictor
    seen = {"prepare": [], "caption": []}
    prepare, caption_batch = predictor.prepare, predictor.caption_batch

    def spy_prepare(source):
        seen["prepare"].append((threading.current_thread().name, asyncio_loop_running()))
        return prepare(source)

    def spy_caption(images, options):
        seen["caption"].append(threading.current_thread().name)
        return caption_batch(images, options)

    predictor.prepare, predictor.caption_batch = spy_prepare, spy_caption
    assert caption(client, ("a.png", png()), ("b.png", png()), method="greedy").status_code == 200
    assert seen["prepare"] == [("captioner-minder-0", False)] * 2
    assert seen["caption"] == ["captioner-minder-0"]


def asyncio_loop_running() -> bool:
    try:
        asyncio.get_running_loop()
        return True
    except RuntimeError:
        return False


def test_a_caption_request_hands_nothing_to_the_thread_pool(client, monkeypatch):
    """The event loop parses and answers; only the model worker's thread and process do more. A
    plain `def` dependency would cost a hand-over to FastAPI's thread pool and back, each request."""
    import anyio.to_thread

    handed = []
    real = anyio.to_thread.run_sync

    async def counting(function, *args, **kwargs):
        handed.append(getattr(function, "__qualname__", repr(function)))
        return await real(function, *args, **kwargs)

    monkeypatch.setattr(anyio.to_thread, "run_sync", counting)
    r = caption(client, ("shapes.png", png()), method="greedy")
    assert r.status_code == 200, r.text
    assert handed == []
