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
# Methods HTTP parsers know and the service does not list: they reach the app under both parsers
# (httptools refuses a made-up one with 400 before the app; h11 passes any name on).
UNLISTED = ["PROPFIND", "MKCOL", "COPY", "MOVE", "LOCK", "UNLOCK", "SEARCH", "PURGE", "REPORT", "MKCALENDAR"]


def label_values(text: str) -> dict[str, set[str]]:
    values: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            for name, value in sample.labels.items():
                values.setdefault(name, set()).add(value)
    return values


@pytest.mark.parametrize("parser", ["httptools", "h11"])
def test_made_up_methods_and_paths_do_not_grow_the_label_sets(start_server, parser):
    """1,500 requests (as many as grew /metrics by 366 KB when methods were labels as sent), on
    keep-alive connections to 127.0.0.1: made-up methods, and real ones the service does not list."""
    server = start_server("--http", parser)
    chance = random.Random(0)
    with httpx.Client(base_url=server.base, timeout=30) as client:
        client.get("/healthz")
        before = len(client.get("/metrics").text)
        for i in range(1500):
            made_up = "".join(chance.choices(string.ascii_uppercase, k=8))
            method = made_up if i % 3 else chance.choice(UNLISTED)
            path = "/" + "".join(chance.choices(string.ascii_lowercase, k=6)) if i % 2 else "/healthz"
            assert client.request(method, path).status_code < 500
        after = client.get("/metrics").text
    values = label_values(after)
    assert values["method"] <= METHODS and "other" in values["method"]
    assert values["route"] <= ROUTES
    assert len(after) - before < 16_000, f"/metrics grew by {len(after) - before} bytes"
