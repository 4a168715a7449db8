"""How `captioner serve` treats its connections: uvicorn's h11 protocol, with a deadline for each
request's head.

uvicorn closes a connection that sits idle between requests (timeout_keep_alive),
but stops counting at a client's first byte: a client that sends its request
line and headers a byte at a time holds a connection, and a place under
limit_concurrency, for as long as it likes. Here a client has `head_timeout`
seconds from connecting (or from its previous answer) to finish a request's
head, or the connection is closed. The body has its own deadline, in the ASGI
guard (api.guard), so it holds under any server.
"""

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("captioner.api")


class HeadDeadlineProtocol(H11Protocol):
    head_timeout: float = 10.0
    _head_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self._arm_head_deadline()

    def on_response_complete(self) -> None:
        self._arm_head_deadline()  # first: a pipelined request handled in there disarms it
        super().on_response_complete()

    def handle_events(self) -> None:
        super().handle_events()
        if self.conn.their_state is not h11.IDLE:  # a request's head has come whole
            self._disarm_head_deadline()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_deadline()
        super().connection_lost(exc)

    def _arm_head_deadline(self) -> None:
        self._disarm_head_deadline()
        self._head_deadline = self.loop.call_later(self.head_timeout, self._head_too_slow)

    def _disarm_head_deadline(self) -> None:
        if self._head_deadline is not None:
            self._head_deadline.cancel()
            self._head_deadline = None

    def _head_too_slow(self) -> None:
        self._head_deadline = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            log.info("closed a connection that sent no whole request head within %g s", self.head_timeout)
            self.transport.close()


def head_deadline_protocol(head_timeout: float) -> type[HeadDeadlineProtocol]:
    """The protocol class for uvicorn's `http=`, with its deadline."""
    return type("HeadDeadlineProtocol", (HeadDeadlineProtocol,), {"head_timeout": head_timeout})
