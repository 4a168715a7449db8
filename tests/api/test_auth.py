"""The API key, against the real server: read from a file or the environment (never argv), needed
on every path but the public ones, under uvicorn's --root-path and behind a path prefix too."""

import subprocess
import sys

import httpx
import pytest

from .helpers import png

pytestmark = pytest.mark.slow

KEY = "correct horse battery staple"
PUBLIC = ["/healthz", "/readyz", "/", "/static/app.js", "/static/style.css", "/docs", "/openapi.json"]
# Protected routes, their neighbours, and paths that try to reach them sideways
PROTECTED = [
    "/v1/model",
    "/metrics",
    "/v1/captions",
    "/v1/",
    "/v1",
    "/nothing",
    "//v1/model",
    "/V1/model",
    "/v1/model/",
    "/healthz/../v1/model",
    "/static/../v1/model",
    "/x/v1/model",
    "/healthz/x",
]


@pytest.fixture
def key_file(tmp_path):
    path = tmp_path / "api-key"
    path.write_text(KEY + "\n")  # as `echo` and editors write it
    return path


def caption(base: str, path: str = "/v1/captions", key: str | None = None) -> httpx.Response:
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.post(
        base + path,
        files=[("images", ("a.png", png(), "image/png"))],
        data={"method": "greedy"},
        headers=headers,
        timeout=60,
    )


def assert_guarded(base: str) -> None:
    for path in PROTECTED:
        r = httpx.get(base + path, timeout=30)
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", (path, r.status_code, r.text)
    for key in (None, "", "wrong", KEY[:-1], KEY + "e", KEY.upper()):
        r = caption(base, "/v1/captions", key)
        assert r.status_code == 401, (key, r.text)
    for path in PUBLIC:
        assert httpx.get(base + path, timeout=30).status_code == 200, path
    assert caption(base, "/v1/captions", KEY).status_code == 200
    assert httpx.get(base + "/v1/model", headers={"X-API-Key": KEY}, timeout=30).status_code == 200
    assert httpx.get(base + "/metrics", headers={"X-API-Key": KEY}, timeout=30).status_code == 200


def test_the_key_from_a_file_guards_every_path_but_the_public_ones(start_server, key_file):
    server = start_server("--api-key-file", str(key_file))
    assert_guarded(server.base)
    assert KEY not in " ".join(server.process.args)


def test_the_key_from_the_environment_and_metrics_made_public(start_server):
    server = start_server("--public-metrics", env={"CAPTIONER_API_KEY": KEY})
    assert httpx.get(server.base + "/metrics", timeout=30).status_code == 200
    assert httpx.get(server.base + "/v1/model", timeout=30).status_code == 401
    assert caption(server.base, key=KEY).status_code == 200


def test_the_key_holds_under_uvicorns_root_path(start_server, key_file, tiny_checkpoint):
    """`uvicorn --root-path /x` used to leave POST /v1/captions open: the guard compared the raw
    path (/x/v1/captions) with /v1/. Requests come as the proxy forwards them, prefix stripped."""
    command = [
        sys.executable,
        "-m",
        "uvicorn",
        "--factory",
        "api.app:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        "PORT",
        "--root-path",
        "/x",
    ]
    server = start_server(
        command=command,
        env={
            "CAPTIONER_CHECKPOINT": str(tiny_checkpoint),
            "CAPTIONER_API_KEY_FILE": str(key_file),
            "CAPTIONER_THREADS": "1",
        },
    )
    assert_guarded(server.base)


def test_the_key_holds_behind_a_path_prefix(start_server, key_file):
    """`captioner serve --root-path /x` behind a proxy that strips /x, and requests that keep it:
    uvicorn adds the root path to every request's path, so /x/v1/model is routed as /x/v1/model,
    which no route serves; it is refused all the same, and nothing protected is reachable."""
    server = start_server("--api-key-file", str(key_file), "--root-path", "/x")
    assert_guarded(server.base)
    for path in PROTECTED + ["/v1/captions"]:
        r = httpx.get(server.base + "/x" + path, timeout=30)
        assert r.status_code == 401, (path, r.status_code)
    assert caption(server.base, "/x/v1/captions").status_code == 401


@pytest.mark.parametrize("content", ["", "\n"])
def test_an_empty_key_file_stops_the_server_before_it_starts(tmp_path, tiny_checkpoint, content):
    path = tmp_path / "key"
    path.write_text(content)
    r = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--checkpoint", str(tiny_checkpoint), "--api-key-file", str(path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and "is empty" in r.stderr


def test_a_key_and_a_key_file_together_are_refused(tmp_path, tiny_checkpoint, key_file):
    env = {"CAPTIONER_API_KEY": "other", "PATH": "/usr/bin:/bin"}
    r = subprocess.run(
        [sys.executable, "-m", "cli", "serve", "--checkpoint", str(tiny_checkpoint), "--api-key-file", str(key_file)],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert r.returncode == 2 and "not both" in r.stderr
