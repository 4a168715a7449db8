"""API fixtures: an app on the tiny checkpoint, a client that runs its lifespan, and the real
server in its own process (`start_server`)."""

import os

import pytest
from fastapi.testclient import TestClient

from api.app import create_app
from api.settings import Settings
from captioner.checkpoint import save_checkpoint
from captioner.model import build_model
from captioner.vocab import Vocabulary
from tests.conftest import tiny_config

from .helpers import ServerProcess, serve_command


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


@pytest.fixture(scope="session")
def small_vocab_checkpoint(tmp_path_factory):
    """A tiny model that knows two words: 3 different captions of at most 1 word, 7 of at most 2."""
    model = build_model(tiny_config(), Vocabulary.build(["cat dog"])).eval()
    path = tmp_path_factory.mktemp("checkpoint") / "two-words.safetensors"
    save_checkpoint(model, path, {"training_data": "tests"})
    return path


@pytest.fixture
def start_server(tiny_checkpoint, tmp_path):
    """`start_server(*flags, checkpoint=..., env=..., command=...)` -> a ServerProcess that is ready:
    `captioner serve` (or `command`, a list whose PORT is replaced) on a free loopback port.
    Killed at the end of the test."""
    servers = []

    def start(*flags, checkpoint=None, env=None, command=None, ready="/readyz") -> ServerProcess:
        argv = command or serve_command(checkpoint or tiny_checkpoint, *flags)
        server = ServerProcess(argv, tmp_path / f"server{len(servers)}.log", env=env, ready=ready)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
