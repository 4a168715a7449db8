"""How `captioner serve` treats its connections: uvicorn's protocols, with a deadline and a size
limit for each request's head.

uvicorn closes a connection that sits idle between requests (timeout_keep_alive),
but stops counting at a client's first byte: a client that sends its request
line and headers a byte at a time holds a connection, and a place under
limit_concurrency, for as long as it likes. Here a client has `head_timeout`
seconds from connecting (or from its previous answer) to finish a request's
head, or the connection is closed. The body has its own deadline, in the ASGI
guard (api.guard), so it holds under any server.

Both of uvicorn's parsers get this: httptools (C, the faster, used when installed) and h11
(pure Python). h11 bounds a head's size itself; for httptools the bytes received before the
head is whole are counted here.
"""

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("captioner.api")

MAX_HEAD_BYTES = 16 * 1024  # a request line and headers longer than this: 400 (h11's uvicorn default, made explicit)


class HeadDeadline(asyncio.Protocol):
    """The deadline, for a uvicorn protocol class that calls `_head_complete()` once a head is whole."""

    head_timeout: float = 10.0
    _head_deadline: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        self._arm_head_deadline()  # first: a pipelined request handled in there disarms it
        super().on_response_complete()  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    @property
    def waiting_for_head(self) -> bool:
        return self._head_deadline is not None

    def _head_complete(self) -> None:
        self._disarm_head_deadline()

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if not self.transport.is_closing():
            log.info("closed a connection that sent no whole request head within %g s", self.head_timeout)
            self.transport.close()


class H11HeadDeadline(HeadDeadline, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's head has come whole
            self._head_complete()


def _httptools_protocol() -> type | None:
    """The httptools protocol with the deadline and the head's size limit, where httptools is installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HttpToolsHeadDeadline(HeadDeadline, HttpToolsProtocol):
        _head_bytes = 0

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if not self.waiting_for_head:
                return
            self._head_bytes += len(data)  # all of it is head: the head is not whole yet
            if self._head_bytes > MAX_HEAD_BYTES and not self.transport.is_closing():
                self.send_400_response("Request head too large.")

        def on_headers_complete(self) -> None:
            self._head_complete()
            super().on_headers_complete()

        def _arm_head_deadline(self) -> None:
            self._head_bytes = 0
            super()._arm_head_deadline()

    return HttpToolsHeadDeadline


def head_deadline_protocol(head_timeout: float, parser: str = "auto") -> type[HeadDeadline]:
    """The protocol class for uvicorn's `http=`, with its deadline: httptools where it is
    installed (parser "auto"), else or when asked ("h11") h11."""
    base = _httptools_protocol() if parser in ("auto", "httptools") else None
    if base is None and parser == "httptools":
        raise RuntimeError("httptools is not installed")
    return type("HeadDeadlineProtocol", (base or H11HeadDeadline,), {"head_timeout": head_timeout})
