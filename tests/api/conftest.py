"""API fixtures: an app on the tiny checkpoint, and a client that runs its lifespan."""

import os

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings


@pytest.fixture(autouse=True)
def no_captioner_environment(monkeypatch):
    """The developer's own CAPTIONER_* variables must not change what a test sees."""
    for name in list(os.environ):
        if name.startswith("CAPTIONER_"):
            monkeypatch.delenv(name)


@pytest.fixture
def make_settings(tiny_checkpoint):
    """Settings on the tiny model."""

    def make(**overrides) -> Settings:
        fields = dict(checkpoint=tiny_checkpoint, max_wait_ms=1.0)
        return Settings(**{**fields, **overrides})

    return make


@pytest.fixture
def make_client(make_settings):
    """`make_client(**settings)` -> a TestClient whose app has started (model loaded)."""
    clients = []

    def make(**overrides) -> TestClient:
        client = TestClient(create_app(make_settings(**overrides)), raise_server_exceptions=False)
        client.__enter__()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.__exit__(None, None, None)


@pytest.fixture
def client(make_client) -> TestClient:
    return make_client()
