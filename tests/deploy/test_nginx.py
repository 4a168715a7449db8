"""docker/nginx.conf for real: nginx (a normal process on a loopback port, everything under a temp
prefix) in front of a real `captioner serve`. A request goes through; a client trickling its request
head is cut off within client_header_timeout; a body over the service's limit gets 413 from nginx.

Needs nginx (Debian: apt-get install nginx-light); skipped where /usr/sbin/nginx is absent.
Loopback only; every wait is bounded.
"""

import os
import pwd
import re
import select
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from api.settings import Settings
from tests.api.helpers import free_port, png

ROOT = Path(__file__).resolve().parents[2]
CONF = ROOT / "docker" / "nginx.conf"
NGINX = Path("/usr/sbin/nginx")
KEY = "test-key-for-the-proxy"


def directives(text: str) -> dict[str, str]:
    """The last value of each simple `name value;` directive, comments dropped."""
    found = {}
    for line in text.splitlines():
        match = re.match(r"\s*(\w+)\s+([^;#{]+);", line)
        if match:
            found[match.group(1)] = match.group(2).strip()
    return found


def seconds(value: str) -> float:
    number, unit = re.fullmatch(r"(\d+)(ms|s|m)?", value).groups()
    return int(number) * {"ms": 1e-3, "s": 1, "m": 60, None: 1}[unit]


def test_the_limits_match_the_service():
    settings = Settings(checkpoint=ROOT / "unused")
    conf = directives(CONF.read_text())
    assert int(conf["client_max_body_size"]) == settings.max_body_bytes
    assert seconds(conf["proxy_read_timeout"]) > settings.request_timeout_s
    for name in ("client_header_timeout", "client_body_timeout", "send_timeout"):
        assert 0 < seconds(conf[name]) <= 30, name
    assert re.search(r"^\s*server 127\.0\.0\.1:8000;", CONF.read_text(), re.M), "the upstream is the loopback port"


needs_nginx = pytest.mark.skipif(
    not NGINX.is_file(), reason="needs nginx at /usr/sbin/nginx (Debian: apt-get install nginx-light)"
)


def wait_until(check, timeout: float, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (httpx.TransportError, OSError):
            pass
        time.sleep(0.1)
    pytest.fail(f"{what} within {timeout} s:\n{log.read_text()[-4000:]}")


def stop(process: subprocess.Popen):
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    """`captioner serve` on a loopback port, with an API key."""
    port = free_port()
    log_path = tmp_path_factory.mktemp("server") / "server.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}
    env["CAPTIONER_API_KEY"] = KEY
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli", "serve", "--checkpoint", str(tiny_checkpoint), "--host", "127.0.0.1",
             "--port", str(port), "--threads", "1", "--max-wait-ms", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)  # fmt: skip
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: process.poll() is None and httpx.get(base + "/readyz", timeout=2).status_code == 200,
                   60, "the server was not ready", log_path)  # fmt: skip
        yield port
    finally:
        stop(process)


@pytest.fixture(scope="module")
def proxy(server, tmp_path_factory):
    """nginx with docker/nginx.conf, its listen and upstream ports moved to free loopback ones."""
    prefix = tmp_path_factory.mktemp("nginx")
    port = free_port()
    text = CONF.read_text()
    text, upstreams = re.subn(r"server 127\.0\.0\.1:8000;", f"server 127.0.0.1:{server};", text)
    text, listens = re.subn(r"^(\s*)listen\s+[^;#]+;", "", text, flags=re.M)
    text = text.replace("server_name _;", f"listen 127.0.0.1:{port};\n    server_name _;", 1)
    assert upstreams == 1 and listens >= 1
    (prefix / "captioner.conf").write_text(text)
    # As root, nginx's workers would switch to `nobody`, who cannot use this prefix: keep our own user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    temp = "\n".join(
        f"  {name}_temp_path {prefix}/{name};" for name in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    (prefix / "nginx.conf").write_text(f"""
{user}
worker_processes 1;
pid {prefix}/nginx.pid;
error_log stderr info;
events {{ worker_connections 64; }}
http {{
  access_log {prefix}/access.log;
{temp}
  include {prefix}/captioner.conf;
}}
""")  # fmt: skip
    command = [str(NGINX), "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", "stderr"]
    checked = subprocess.run([*command, "-t"], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stderr
    log_path = prefix / "nginx.out"
    with open(log_path, "w") as log:
        process = subprocess.Popen([*command, "-g", "daemon off;"], stdout=log, stderr=subprocess.STDOUT)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: process.poll() is None and httpx.get(base + "/healthz", timeout=2).status_code == 200,
                   15, "nginx did not answer", log_path)  # fmt: skip
        yield port
    finally:
        stop(process)


def raw_request(port: int, head: bytes, timeout: float = 10) -> bytes:
    """Send a request head, read the answer's head (or until nginx closes, or `timeout` passes)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head)
        received = b""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            received += chunk
            if b"\r\n\r\n" in received:
                break
        return received


@needs_nginx
@pytest.mark.slow
def test_a_request_goes_through_the_proxy(proxy):
    base = f"http://127.0.0.1:{proxy}"
    picture = png()
    files = [("images", ("through.png", picture, "image/png"))]
    r = httpx.post(
        base + "/v1/captions", files=files, data={"method": "greedy"}, headers={"X-API-Key": KEY}, timeout=60
    )
    assert r.status_code == 200, r.text
    assert r.json()["results"][0]["file"] == "through.png"
    assert r.headers["server"] == "nginx"  # server_tokens off: no version
    assert httpx.post(base + "/v1/captions", files=files, timeout=60).status_code == 401  # the key still counts
    assert httpx.get(base + "/readyz", timeout=10).status_code == 200
    assert httpx.get(base + "/metrics", timeout=10).status_code == 404  # scraped directly, not through the front


@needs_nginx
@pytest.mark.slow
def test_a_client_trickling_its_request_head_is_cut_off(proxy):
    limit = seconds(directives(CONF.read_text())["client_header_timeout"])
    with socket.create_connection(("127.0.0.1", proxy), timeout=5) as sock:
        start = time.monotonic()
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: localhost\r\n")
        closed = None
        # One header line every half second: never a pause long enough for a per-read timeout.
        for i in range(int(limit * 2 + 10) * 2):
            readable, _, _ = select.select([sock], [], [], 0.5)
            if readable:
                try:
                    data = sock.recv(65536)
                except ConnectionResetError:
                    data = b""
                if not data or data.startswith(b"HTTP/1.1 408"):
                    closed = time.monotonic() - start
                    break
            try:
                sock.sendall(f"X-Trickle-{i}: {'a' * 8}\r\n".encode())
            except (BrokenPipeError, ConnectionResetError):
                closed = time.monotonic() - start
                break
    # Cut off while it still trickled (a per-read timeout never would), and not before its deadline;
    # how late after it is the machine's load, not nginx's rule.
    assert closed is not None, f"still connected after {time.monotonic() - start:.1f} s"
    assert closed >= limit - 1, f"cut off after {closed:.1f} s, client_header_timeout is {limit} s"


@needs_nginx
@pytest.mark.slow
def test_a_body_over_the_limit_gets_413_from_nginx(proxy):
    limit = int(directives(CONF.read_text())["client_max_body_size"])
    head = (f"POST /v1/captions HTTP/1.1\r\nHost: localhost\r\nX-API-Key: {KEY}\r\n"
            f"Content-Type: multipart/form-data; boundary=B\r\nContent-Length: {limit + 1}\r\n\r\n")  # fmt: skip
    answer = raw_request(proxy, head.encode())
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
