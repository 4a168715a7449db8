"""The checks made before a request's body is read: the API key, and the body's size.

Both run as ASGI middleware, so a client without the key, or with a body over the
limit, is answered before a byte of its upload is parsed.
"""

import hmac

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import APIError

PROTECTED_PREFIX = "/v1/"


class RequestGuard:
    def __init__(self, app: ASGIApp, max_body_bytes: int, api_key: str | None = None):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.api_key = api_key.encode() if api_key else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        if self.api_key and scope["path"].startswith(PROTECTED_PREFIX):
            if not hmac.compare_digest(headers.get(b"x-api-key", b""), self.api_key):
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
