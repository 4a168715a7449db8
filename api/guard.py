"""The checks made before a request's body is read: the API key, and the body's size.

Both run as ASGI middleware, so a client without the key, or with a body over the
limit, is answered before a byte of its upload is parsed.

With a key set, every path needs it but the public ones: the probes, the page and
its files (it asks for the key itself), the API's description, and /metrics when
the settings open it. A path is judged as the router routes it (Starlette's
route path, with any --root-path taken off), so a prefix cannot move a protected
route out of sight, and an unknown path is refused like a protected one.
"""

import hashlib
import hmac

from starlette._utils import get_route_path
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
    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None = None, public_metrics: bool = False):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.key_digest = _digest(api_key.encode()) if api_key else None
        self.public_metrics = public_metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.key_digest and not is_public(get_route_path(scope), self.public_metrics):
            if not hmac.compare_digest(_digest(headers.get(b"x-api-key", b"")), self.key_digest):
                error = APIError(401, "unauthorized", "send the API key in the X-API-Key header",
                                 {"WWW-Authenticate": "X-API-Key"})
                await error.response()(scope, receive, send)
                return
        declared = headers.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            await _too_large(self.max_body_bytes).response()(scope, receive, send)
            return
        await self.app(scope, _limited(receive, self.max_body_bytes), send)


def _too_large(limit: int) -> APIError:
    return APIError(413, "too_large", f"the request body is over {limit} bytes")


def _limited(receive: Receive, limit: int) -> Receive:
    """`receive` that counts body bytes as they arrive (chunked uploads declare no length)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise _too_large(limit)
        return message

    return counted
