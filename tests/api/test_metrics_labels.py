"""/metrics stays small whatever clients send: made-up methods and paths, against the real server."""

import random
import string

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.slow

ROUTES = {
    "/v1/captions",
    "/v1/model",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
    "/static",
    "/docs",
    "/openapi.json",
    "/docs/oauth2-redirect",
    "/redoc",
    "unmatched",
}
METHODS = {"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "other"}


def label_values(text: str) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                values.setdefault(name, set()).add(value)
    return values


def test_made_up_methods_and_paths_do_not_grow_the_label_sets(start_server):
    """1,500 requests (as many as grew /metrics by 366 KB when methods were labels as sent), on one
    keep-alive connection to 127.0.0.1."""
    server = start_server()
    chance = random.Random(0)
    with httpx.Client(base_url=server.base, timeout=30) as client:
        client.get("/healthz")
        before = len(client.get("/metrics").text)
        for i in range(1500):
            method = "".join(chance.choices(string.ascii_uppercase, k=8))
            path = "/" + "".join(chance.choices(string.ascii_lowercase, k=6)) if i % 2 else "/healthz"
            client.request(method, path)
        after = client.get("/metrics").text
    values = label_values(after)
    assert values["method"] <= METHODS and "other" in values["method"]
    assert values["route"] <= ROUTES
    assert len(after) - before < 16_000, f"/metrics grew by {len(after) - before} bytes"
