"""GET /v1/model, health and readiness, the page, and start-up."""

import pytest
import torch
from fastapi.testclient import TestClient

from api.app import create_app
from api.workers import ModelMissing
from captioner.checkpoint import read_header
from captioner.decoding import MAX_BEAM_SIZE, MAX_LENGTH


def test_model_card_describes_the_model_its_training_and_limits(make_client, tiny_checkpoint):
    client = make_client(max_images=5, max_bytes=1234, max_pixels=5678)
    card = client.get("/v1/model").json()
    config, vocab, saved_card = read_header(tiny_checkpoint)
    assert card["checkpoint"] == tiny_checkpoint.name
    assert card["encoder"] == "tiny" and card["attention"] is True and card["cell"] == "lstm"
    assert card["vocab_size"] == len(vocab)
    assert card["attention_grid"] == [8, 8]
    assert card["config"] == config.to_dict()
    assert card["training_data"] == saved_card["training_data"] == "tests"
    assert card["scores"] == {"CIDEr": 0.0}
    assert card["vocabulary"] == [w for w in vocab.words if not w.startswith("<")]
    assert card["limits"] == {
        "max_beam_size": MAX_BEAM_SIZE,
        "max_captions": 10,
        "max_length": MAX_LENGTH,
        "max_top_k": 1000,
        "max_images": 5,
        "max_bytes": 1234,
        "max_pixels": 5678,
        "max_decode_bytes": 512 * 1024 * 1024,
        "max_response_bytes": 64 * 1024 * 1024,
        "formats": ["JPEG", "PNG", "WEBP", "GIF", "BMP"],
    }


def test_health_and_readiness(client):
    health = client.get("/healthz").json()
    assert health["status"] == "ok" and health["workers_alive"] == health["workers"] >= 1
    assert client.get("/readyz").json() == {"status": "ready"}


def test_readiness_fails_once_the_worker_stops(make_settings):
    app = create_app(make_settings())
    with TestClient(app) as client:
        app.state.batcher.stop()
        r = client.get("/readyz")
        assert r.status_code == 503 and r.json()["error"]["code"] == "not_ready"


def test_the_page_and_its_files_are_served(client):
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    assert 'src="/static/app.js"' in r.text and 'href="/static/style.css"' in r.text
    for path, kind in (("/static/app.js", "javascript"), ("/static/style.css", "text/css")):
        r = client.get(path)
        assert r.status_code == 200 and kind in r.headers["content-type"]
        assert "http://" not in r.text and "https://" not in r.text  # nothing fetched from elsewhere


def test_a_missing_checkpoint_fails_start_up_saying_what_to_run(make_settings, tmp_path):
    app = create_app(make_settings(checkpoint=tmp_path / "none.safetensors"))
    with pytest.raises(ModelMissing, match=r"captioner demo --no-serve"), TestClient(app):
        pass


@pytest.mark.parametrize(
    "workers, threads_here",
    [(1, 3), (3, 1)],  # the model in a thread of the server; in processes forked from one that never used a team
)
def test_start_up_sets_the_torch_threads_once(make_settings, monkeypatch, workers, threads_here):
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    with TestClient(create_app(make_settings(threads=3, workers=workers))):
        pass
    assert calls == [threads_here]


def test_shutdown_stops_the_model_worker(make_settings):
    app = create_app(make_settings())
    with TestClient(app):
        thread = app.state.batcher._thread
        assert thread.is_alive()
    assert not thread.is_alive()
