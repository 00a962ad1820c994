"""The HTTP/1.1 connections the gateway serves: uvicorn's httptools protocol, with bounds.

uvicorn's httptools protocol neither limits a request's header bytes nor times their arrival
(its one timer, keep-alive, starts after an answer): 1 MiB of headers is read and kept, and
a connection that sends half a request, or nothing, is held for as long as the caller likes.
Here, per connection:

- headers (request line included) above ``server.max_header_bytes`` get a 431 and a closed
  connection, found while they arrive: at most one more read is buffered past the bound;
- a request whose headers are not complete ``server.header_timeout_s`` after its first byte
  gets a 408 and a closed connection; a new connection that sends nothing for that long is
  closed;
- a request httptools cannot parse gets mjgate's JSON 400 (uvicorn's is plain text);
- a response's head goes out in one system call with its body's first part
  (``OneWriteCycle``): uvicorn writes each ASGI message as it comes, two sends for
  every answer.

A body's deadline is the front layer's (``gateway.middleware.deadline``): it answers 408
with the request id and the access line like any other answer.

The gunicorn master imports this module (through the worker class): it must not import the
app's modules, whose metrics would be created in the master.
"""

from __future__ import annotations

import asyncio
import itertools
import os
from asyncio import TimerHandle
from typing import TYPE_CHECKING, Any, ClassVar

import structlog
from uvicorn.protocols.http.httptools_impl import (
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.config import ServerConfig
from gateway.errors import error_response

if TYPE_CHECKING:
    from uvicorn._types import ASGISendEvent

__all__ = ["BoundedHttpTools", "OneWriteCycle", "bounded_http"]

log = structlog.get_logger("mjgate.http")


class BoundedHttpTools(HttpToolsProtocol):
    """``HttpToolsProtocol`` with a bound on header bytes and on header time; the bounds come
    from the subclass ``bounded_http`` makes.

    One timer per connection, not one per request: it fires every ``header_timeout_s`` at
    most and checks the request in its headers then, if any (arming and cancelling a timer
    on every request cost a cached fetch more than the check does)."""

    max_header_bytes: ClassVar[int]
    header_timeout_s: ClassVar[float]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._awaiting_headers = True  # between requests, or inside a request's headers
        self._begun = False  # the first byte of a request whose headers are not complete
        self._headers_since: float | None = None  # when the wait for those headers began
        self._raw_bytes = 0  # read while awaiting headers
        self._timer: TimerHandle | None = None
        self._refused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[arg-type]
        self._headers_since = self.loop.time()
        self._timer = self.loop.call_later(self.header_timeout_s, self._check_header_time)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timer()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._refused:
            return
        if self._awaiting_headers:
            self._raw_bytes += len(data)
        super().data_received(data)
        if self._refused or self.transport.is_closing():
            return  # refused by a callback, or uvicorn's own 400 for a malformed request
        if self._awaiting_headers and self._raw_bytes > self.max_header_bytes:
            self._refuse(431, f"request headers are larger than {self.max_header_bytes} bytes")

    # Parser callbacks

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._begun = True
        self._headers_since = self.loop.time()

    def on_headers_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_headers = self._begun = False
        self._headers_since = None
        self._raw_bytes = 0
        # Counted here once rather than in per-header callbacks: the raw count above may
        # include a body or a pipelined request's bytes, this one is the headers' own.
        size = len(self.url) + 4 * len(self.headers)  # ": " and CRLF
        size += sum(map(len, itertools.chain.from_iterable(self.headers)))
        if size > self.max_header_bytes:
            self._refuse(431, f"request headers are larger than {self.max_header_bytes} bytes")
            return
        super().on_headers_complete()
        # uvicorn builds the cycle itself and offers no hook to choose its class; its task
        # has not run yet, so the class can still change under it.
        if type(self.cycle) is RequestResponseCycle:
            self.cycle.__class__ = OneWriteCycle

    def on_body(self, body: bytes) -> None:
        if not self._refused:
            super().on_body(body)

    def on_message_complete(self) -> None:
        if self._refused:
            return
        self._awaiting_headers = True
        self._raw_bytes = 0
        super().on_message_complete()

    def send_400_response(self, msg: str) -> None:
        """A request httptools cannot parse: mjgate's JSON error, not uvicorn's plain text."""
        self._refuse(400, "malformed HTTP request")

    # Bounds

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _check_header_time(self) -> None:
        self._timer = None
        if self._refused or self.transport.is_closing():
            return
        waited = 0.0 if self._headers_since is None else self.loop.time() - self._headers_since
        if waited < self.header_timeout_s:
            self._timer = self.loop.call_later(
                self.header_timeout_s - waited, self._check_header_time
            )
        elif self._begun:
            self._refuse(408, f"request headers did not arrive within {self.header_timeout_s:g} s")
        else:
            self.transport.close()  # connected, sent nothing: no request to answer

    def _refuse(self, status: int, description: str) -> None:
        """Answer ``status`` as mjgate's JSON error and close the connection."""
        self._refused = True
        self._cancel_timer()
        request_id = os.urandom(16).hex()  # the shape of the front layer's ids
        body = bytes(error_response(status, description, request_id).body)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head += [name, b": ", value, b"\r\n"]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: %d\r\n" % len(body),
            b"x-request-id: %s\r\n" % request_id.encode(),
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()
        log.warning("request_refused", status=status, request_id=request_id, reason=description)


class OneWriteCycle(RequestResponseCycle):
    """uvicorn's request-response cycle, sending a response's head together with the first
    part of its body: one system call instead of two, a tenth of a cached fetch's CPU.

    uvicorn still builds and checks the head; it writes it to a ``_HeadHold``, which keeps it
    until the body's first write, and no later than the end of the event loop's current
    step (a stream that sends its head and waits for events must not keep its caller
    waiting for the headers)."""

    _hold: _HeadHold | None = None

    async def send(self, message: ASGISendEvent) -> None:
        if self.flow.write_paused and not self.disconnected:
            # As uvicorn's send does first, but before the swap below: another task's write
            # while this one waits (receive's "100 Continue") must not land in the hold.
            await self.flow.drain()
        hold = self._hold
        if message["type"] == "http.response.start" and not self.response_started:
            hold = self._hold = _HeadHold(self.transport)
            asyncio.get_running_loop().call_soon(hold.flush)
        elif hold is None:
            await super().send(message)
            return
        else:
            self._hold = None
        transport = self.transport
        self.transport = hold  # type: ignore[assignment]  # what uvicorn writes to
        try:
            await super().send(message)
        finally:
            self.transport = transport
        if self._hold is None:
            hold.flush()


class _HeadHold:
    """Stands in for a connection's transport while uvicorn writes a response: the first
    write (the head) is kept, and goes out with the next one, or alone on ``flush``."""

    __slots__ = ("_head", "_transport")

    def __init__(self, transport: asyncio.Transport) -> None:
        self._transport = transport
        self._head: bytes | None = None  # None: the head is still to come

    def write(self, data: bytes) -> None:
        if self._head is None:
            self._head = data
            return
        head, self._head = self._head, b""
        if head:
            self._transport.writelines((head, data))
        else:
            self._transport.write(data)

    def flush(self) -> None:
        head, self._head = self._head, b""
        if head and not self._transport.is_closing():
            self._transport.write(head)

    def close(self) -> None:
        self.flush()
        self._transport.close()


def bounded_http(server: ServerConfig) -> type[BoundedHttpTools]:
    """The protocol class for uvicorn's ``http`` setting, with ``server``'s bounds."""

    class Bounded(BoundedHttpTools):
        max_header_bytes = server.max_header_bytes
        header_timeout_s = server.header_timeout_s

    return Bounded
