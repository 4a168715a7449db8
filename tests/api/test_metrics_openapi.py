"""/metrics exposes the service's series; the OpenAPI schema documents the endpoints with examples."""

from prometheus_client.parser import text_string_to_metric_families

from api.errors import IMAGE_ERROR_STATUS

from .helpers import png, upload


def samples(client) -> dict:
    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


def test_metrics_count_requests_errors_latency_batches_and_queue(client):
    client.post("/v1/captions", files=upload(("a.png", png()), ("b.png", png())), data={"method": "greedy"})
    client.post("/v1/captions", files=upload(("a.txt", b"text")))
    client.get("/no/such/page")
    s = samples(client)
    assert s[("captioner_http_requests_total", (("method", "POST"), ("route", "/v1/captions"), ("status", "200")))] == 1
    assert s[("captioner_http_requests_total", (("method", "POST"), ("route", "/v1/captions"), ("status", "415")))] == 1
    assert s[("captioner_http_errors_total", (("route", "/v1/captions"), ("status", "415")))] == 1
    assert s[("captioner_http_errors_total", (("route", "unmatched"), ("status", "404")))] == 1
    assert s[("captioner_http_request_duration_seconds_count", (("route", "/v1/captions"),))] == 2
    assert s[("captioner_batch_size_count", ())] == 1
    assert s[("captioner_batch_size_sum", ())] == 2
    assert s[("captioner_images_total", ())] == 2
    assert s[("captioner_queue_depth", ())] == 0


def test_each_app_has_its_own_registry(make_client):
    first, second = make_client(), make_client()
    first.post("/v1/captions", files=upload(("a.png", png())), data={"method": "greedy"})
    assert samples(first)[("captioner_images_total", ())] == 1
    assert samples(second)[("captioner_images_total", ())] == 0


def test_openapi_documents_the_endpoints_with_examples(client):
    schema = client.get("/openapi.json").json()
    paths = schema["paths"]
    assert {"/v1/captions", "/v1/model", "/healthz", "/readyz", "/metrics"} <= set(paths)
    post = paths["/v1/captions"]["post"]
    assert "multipart/form-data" in post["requestBody"]["content"]
    for status in ("200", "413", "415", "422", "503"):
        assert status in post["responses"], status
    example = post["responses"]["415"]["content"]["application/json"]["examples"]["unsupported_format"]
    assert example["value"]["error"]["code"] == "unsupported_format"
    components = schema["components"]["schemas"]
    assert components["CaptionResponse"]["examples"][0]["results"][0]["captions"]
    assert components["ModelCard"]["examples"][0]["limits"]
    body = post["requestBody"]["content"]["multipart/form-data"]["schema"]
    options = body["properties"]
    for name in ("method", "beam_size", "num_captions", "temperature", "top_k", "max_length", "seed"):
        assert options[name].get("examples"), name
    assert options["beam_size"]["maximum"] == 10
    assert options["images"]["type"] == "array" and body["required"] == ["images"]


def test_every_status_and_code_of_a_caption_request_is_documented(client):
    """Each status POST /v1/captions answers with, and each error code under it (an image's own
    from captioner.images; the rest raised by api), has its example in the OpenAPI responses."""
    responses = client.get("/openapi.json").json()["paths"]["/v1/captions"]["post"]["responses"]
    assert set(responses) == {"200", "400", "401", "408", "413", "415", "422", "500", "503", "504"}
    codes = {int(s): set(r["content"]["application/json"]["examples"]) for s, r in responses.items() if s != "200"}
    uploaded = {code: status for code, status in IMAGE_ERROR_STATUS.items() if code != "unreadable"}  # a path's only
    raised = {"bad_request": 400, "unauthorized": 401, "body_timeout": 408, "invalid_option": 422, "missing_image": 422}
    raised |= {"too_many_files": 422, "response_too_large": 422, "internal_error": 500, "overloaded": 503}
    raised |= {"shutting_down": 503, "model_worker_lost": 503, "model_worker_dead": 503, "timeout": 504}
    for code, status in {**uploaded, **raised}.items():
        assert code in codes[status], (code, status)
    assert "text/plain" in responses["503"]["content"]  # uvicorn's own, over limit_concurrency
