"""Test pictures, multipart helpers and the real server process for the API tests."""

import io
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from PIL import Image, ImageDraw


def picture(size=(96, 80), background=(170, 170, 170)) -> Image.Image:
    """A Shapes-like picture: a red circle and a blue square."""
    image = Image.new("RGB", size, background)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.1, h * 0.1, w * 0.45, h * 0.45), fill=(220, 50, 50))
    draw.rectangle((w * 0.55, h * 0.55, w * 0.9, h * 0.9), fill=(50, 90, 220))
    return image


def encode(image: Image.Image, format: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=format, **params)
    return buffer.getvalue()


def png(size=(96, 80), **kwargs) -> bytes:
    return encode(picture(size, **kwargs))


def upload(*files: tuple[str, bytes], content_type: str = "application/octet-stream") -> list:
    """httpx's multipart list for the form field `images`."""
    return [("images", (name, data, content_type)) for name, data in files]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(checkpoint: Path, *flags: str) -> list[str]:
    """`captioner serve` on the loopback address, its port left as PORT."""
    return [
        sys.executable,
        "-m",
        "cli",
        "serve",
        "--checkpoint",
        str(checkpoint),
        "--host",
        "127.0.0.1",
        "--port",
        "PORT",
        "--threads",
        "1",
        *flags,
    ]


class ServerProcess:
    """A server in its own process on a free loopback port, started and waited for (bounded).

    Its environment has no CAPTIONER_* variable but those in `env`."""

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str] | None = None, ready: str = "/readyz"):
        self.port = free_port()
        self.argv = [str(self.port) if a == "PORT" else a for a in argv]
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path, self.ready = log_path, ready
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("CAPTIONER_")}, **(env or {})}
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 90) -> "ServerProcess":
        self._log = open(self.log_path, "w+")  # noqa: SIM115 - the server writes it until stop() closes it
        self.process = subprocess.Popen(
            self.argv, stdout=self._log, stderr=subprocess.STDOUT, env=self.env, cwd=Path(__file__).resolve().parents[2]
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited ({self.process.returncode}):\n{self.log()}")
            try:
                if httpx.get(self.base + self.ready, timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the server was not ready within {timeout:.0f} s:\n{self.log()}")

    def log(self) -> str:
        self._log.flush()
        return self.log_path.read_text()[-6000:]

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(30)
        if hasattr(self, "_log"):
            self._log.close()

    def __enter__(self) -> "ServerProcess":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


BOUNDARY = "captioner-test-boundary"


def form_part(name: str, data: bytes = b"", filename: str | None = None) -> bytes:
    """One part of a multipart/form-data body (a file when it has a filename)."""
    disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
    kind = "Content-Type: application/octet-stream\r\n" if filename is not None else ""
    return f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n{kind}\r\n".encode() + data + b"\r\n"


FORM_END = f"--{BOUNDARY}--\r\n".encode()


class RawClient:
    """HTTP/1.1 over a plain socket, for what httpx will not do: send part of a body and stop,
    trickle bytes, hang up mid-request. Every wait is bounded by `timeout`."""

    def __init__(self, server, timeout: float = 60):
        self.socket = socket.create_connection(("127.0.0.1", server.port), timeout=timeout)

    def send_head(self, length: int | None, path: str = "/v1/captions", headers: dict[str, str] | None = None) -> None:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", f"Content-Type: multipart/form-data; boundary={BOUNDARY}"]
        if length is not None:
            lines.append(f"Content-Length: {length}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        self.send(("\r\n".join(lines) + "\r\n\r\n").encode())

    def send(self, data: bytes) -> None:
        self.socket.sendall(data)

    def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response: status, headers (lower-case names), body."""
        import http.client

        answer = http.client.HTTPResponse(self.socket)
        answer.begin()
        return answer.status, {k.lower(): v for k, v in answer.getheaders()}, answer.read()

    def closed_by_server(self) -> bool:
        """True once the server has closed the connection (b"" from recv, or a reset)."""
        try:
            while True:
                data = self.socket.recv(65536)
                if not data:
                    return True
        except ConnectionResetError:
            return True

    def close(self) -> None:
        self.socket.close()


def metric(server, name: str, labels: dict | None = None, headers: dict | None = None) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(server.base + "/metrics", headers=headers or {}, timeout=30).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and (labels is None or sample.labels == labels):
                return sample.value
    return 0.0


def wait_until(condition, what: str, timeout: float = 30) -> None:
    """Poll `condition` (bounded); fails naming `what` if it never holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"{what}: not within {timeout:.0f} s")
