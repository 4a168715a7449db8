"""How `captioner serve` treats its connections: uvicorn's protocols, with a deadline and a size
limit for each request's head, and a lingering close after an answer sent before the body ended.

uvicorn closes a connection that sits idle between requests (timeout_keep_alive),
but stops counting at a client's first byte: a client that sends its request
line and headers a byte at a time holds a connection, and a place under
limit_concurrency, for as long as it likes. Here a client has `head_timeout`
seconds from connecting (or from its previous answer) to finish a request's
head, or the connection is closed. The body has its own deadline, in the ASGI
guard (api.guard), so it holds under any server.

An answer sent before the request's body has all arrived (413, 401, a 503 at
admission) ends the connection, and closing a socket with unread bytes in it
makes the kernel send a reset: a client still sending its body, as most
simple ones do before they read, loses the answer. So the connection lingers,
as RFC 9112 (9.6) asks and nginx's lingering_close does: it is half-closed
after the answer (the client reads it, then end of file), and what the client
still sends is read and thrown away, until the client closes its side or the
body's own bounds are reached: `max_body_bytes` received since the head, or
`body_timeout` seconds after it. A lingering connection stays one of uvicorn's
connections, under limit_concurrency, so it holds no more than a slow body may.

Both of uvicorn's parsers get this: httptools (C, the faster, used when installed) and h11
(pure Python). h11 bounds a head's size itself; for httptools the bytes received before the
head is whole are counted here.
"""

import asyncio
import logging
from collections.abc import Callable
from typing import Any, cast

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


class _LingeringTransport:
    """The socket's transport as uvicorn sees it: its first close() may linger instead
    (`linger()` says whether it does); any later close() closes. Writes stop at the first close,
    as a closing transport's do (and the half-closed socket takes none)."""

    def __init__(self, transport: asyncio.Transport, linger: Callable[[], bool]):
        self._transport, self._linger = transport, linger
        self._closing = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def close(self) -> None:
        if self._closing or not self._linger():
            self._transport.close()
        self._closing = True

    def is_closing(self) -> bool:
        return self._closing or self._transport.is_closing()

    def write(self, data: bytes) -> None:
        if not self.is_closing():
            self._transport.write(data)


class LingeringClose(HeadDeadline):
    """The head's deadline, and a lingering close for a uvicorn protocol whose request cycle
    (`self.cycle`) tells by `more_body` whether the request's body is still to come."""

    body_timeout: float = 60.0
    max_body_bytes: int = 2**63
    cycle: Any  # uvicorn's RequestResponseCycle, of either parser
    _body_deadline = float("inf")  # loop time; the head starts the body's clock
    _body_bytes = 0  # received since the head, what was read and what was thrown away
    _lingering = False
    _lost = False
    _linger_end: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(cast(asyncio.Transport, _LingeringTransport(transport, self._start_lingering)))

    def data_received(self, data: bytes) -> None:
        if self._lingering:
            self._discard(len(data))
            return
        super().data_received(data)
        if not self.waiting_for_head:
            self._body_bytes += len(data)  # with the head's own bytes when they came in the same read

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        self._cancel_linger_end()
        super().connection_lost(exc)

    def _head_complete(self) -> None:
        if self.waiting_for_head:  # h11's protocol says so again with each piece of the body
            self._body_deadline = self.loop.time() + self.body_timeout
            self._body_bytes = 0
        super()._head_complete()

    def _arm_head_deadline(self) -> None:
        if not self._lingering:  # the answer given: no next request is read
            super()._arm_head_deadline()

    def _start_lingering(self) -> bool:
        """Called as uvicorn closes the connection: half-close it and linger (True) if the request's
        body is still coming and within its bounds; else (False) close at once."""
        body_unread = not self._lost and self.cycle is not None and self.cycle.more_body
        if not body_unread or not self._within_bounds():
            return False
        self._lingering = True
        self._disarm_head_deadline()
        self.transport.write_eof()  # after what is buffered: the answer goes first
        self.transport.resume_reading()  # uvicorn pauses reading while a body waits to be read
        self._linger_end = self.loop.call_at(self._body_deadline, self._stop_lingering)
        return True

    def _cancel_linger_end(self) -> None:
        if self._linger_end is not None:
            self._linger_end.cancel()
            self._linger_end = None

    def _within_bounds(self) -> bool:
        return self._body_bytes <= self.max_body_bytes and self.loop.time() < self._body_deadline

    def _discard(self, size: int) -> None:
        self._body_bytes += size
        if self._body_bytes > self.max_body_bytes:
            self._stop_lingering(f"at {self._body_bytes} bytes, over the limit of {self.max_body_bytes}")

    def _stop_lingering(self, why: str = "") -> None:
        self._cancel_linger_end()
        if not self._lost:
            why = why or f"at its deadline, {self.body_timeout:g} s after its head"
            log.info("stopped reading a refused request's body %s: connection closed", why)
            self.transport.close()


class H11Connection(LingeringClose, H11Protocol):
    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's head has come whole
            self._head_complete()


def _httptools_protocol() -> type[LingeringClose] | None:
    """The httptools protocol with the deadline, the head's size limit and the lingering close,
    where httptools is installed."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:
        return None

    class HttpToolsConnection(LingeringClose, HttpToolsProtocol):
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

    return HttpToolsConnection


def connection_protocol(
    head_timeout: float, body_timeout: float, max_body_bytes: int, parser: str = "auto"
) -> type[LingeringClose]:
    """The protocol class for uvicorn's `http=`, with its bounds: httptools where it is installed
    (parser "auto"), else or when asked ("h11") h11."""
    base = _httptools_protocol() if parser in ("auto", "httptools") else None
    if base is None and parser == "httptools":
        raise RuntimeError("httptools is not installed")
    bounds = {"head_timeout": head_timeout, "body_timeout": body_timeout, "max_body_bytes": max_body_bytes}
    return type("ConnectionProtocol", (base or H11Connection,), bounds)
