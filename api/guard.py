"""The checks made before a request's body is read: the API key, the body's size and its deadline.

They run as ASGI middleware, so a client without the key, or with a body over the
limit, is answered before a byte of its upload is parsed, and a body that trickles
in is cut off at its deadline (408), under `captioner serve` or any ASGI server.

With a key set, every path needs it but the public ones: the probes, the page and
its files (it asks for the key itself), the API's description, and /metrics when
the settings open it. A path is judged as the router routes it (Starlette's
route path, with any --root-path taken off), so a prefix cannot move a protected
route out of sight, and an unknown path is refused like a protected one.
"""

import hashlib
import hmac
import time

import anyio
from starlette._utils import get_route_path
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

PUBLIC_PATHS = frozenset({"/healthz", "/readyz", "/", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
PUBLIC_PREFIXES = ("/static/",)


def is_public(path: str, public_metrics: bool = False) -> bool:
    return path in PUBLIC_PATHS or path.startswith(PUBLIC_PREFIXES) or (public_metrics and path == "/metrics")


def _digest(key: bytes) -> bytes:
    """Keys are compared as SHA-256 digests: equal lengths, so the comparison's time tells nothing,
    not even the key's length."""
    return hashlib.sha256(key).digest()


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        max_body_bytes: int,
        api_key: str | None = None,
        public_metrics: bool = False,
        body_timeout: float = 60.0,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.body_timeout = body_timeout
        self.key_digest = _digest(api_key.encode()) if api_key else None
        self.public_metrics = public_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        body = _Body(
            receive,
            self.max_body_bytes,
            expected=_has_body(headers),
            deadline=time.monotonic() + self.body_timeout,
            timeout=self.body_timeout,
        )
        send = body.closing_if_unread(send)
        if (
            self.key_digest
            and not is_public(get_route_path(scope), self.public_metrics)
            and not hmac.compare_digest(_digest(headers.get(b"x-api-key", b"")), self.key_digest)
        ):
            error = APIError(
                401, "unauthorized", "send the API key in the X-API-Key header", {"WWW-Authenticate": "X-API-Key"}
            )
            await error.response()(scope, receive, send)
            return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _too_large(self.max_body_bytes).response()(scope, receive, send)
            return
        await self.app(scope, body.receive, send)


def _has_body(headers: dict[bytes, bytes]) -> bool:
    return headers.get(b"content-length", b"0") not in (b"0", b"") or b"transfer-encoding" in headers


def _too_large(limit: int) -> APIError:
    return APIError(413, "too_large", f"the request body is over {limit} bytes")


class _Body:
    """The request's body as it arrives: counted against the limit (chunked uploads declare no
    length), due whole by its deadline (408 beyond it), and remembered as complete or not.

    An answer sent before the whole body has arrived (a refusal, mostly) closes the connection:
    the rest of the body never reaches the app. Under `captioner serve` the connection first
    lingers, reading and throwing away what the client still sends within the body's own limit
    and deadline, so that the client reads the answer instead of a reset (api.connections)."""

    def __init__(self, receive: Receive, limit: int, expected: bool, deadline: float, timeout: float):
        self._receive, self.limit = receive, limit
        self.complete = not expected
        self.seen = 0
        self.deadline, self.timeout = deadline, timeout

    async def receive(self) -> Message:
        if self.complete:  # the body is in; what comes next is the disconnect, whenever it comes
            return await self._receive()
        try:
            with anyio.fail_after(max(0.0, self.deadline - time.monotonic())):
                message = await self._receive()
        except TimeoutError:
            raise APIError(408, "body_timeout", f"the request body did not arrive within {self.timeout:g} s") from None
        if message["type"] == "http.request":
            self.seen += len(message.get("body", b""))
            if self.seen > self.limit:
                raise _too_large(self.limit)
            if not message.get("more_body", False):
                self.complete = True
        return message

    def closing_if_unread(self, send: Send) -> Send:
        async def send_closing(message: Message) -> None:
            if message["type"] == "http.response.start" and not self.complete:
                MutableHeaders(scope=message)["connection"] = "close"
            await send(message)

        return send_closing
