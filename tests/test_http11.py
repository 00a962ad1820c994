"""gateway/http11.py: a response's head leaves in the same write as its body's first part,
and never later than the end of the loop's step. (The header bounds are tested over real
sockets in test_limits_http.py.)"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.server import ServerState

from gateway.config import ServerConfig
from gateway.http11 import bounded_http

GET = b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n"
Send = Any  # the ASGI callables, loosely: these apps are test doubles


class RecordingTransport(asyncio.Transport):
    """A connection that records each write (one list of parts per system call)."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[list[bytes]] = []
        self.closed = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        addresses = {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}
        return addresses.get(name, default)

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.writes.append([bytes(data)])

    def writelines(self, parts: Any) -> None:
        self.writes.append([bytes(part) for part in parts])

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    @property
    def sent(self) -> bytes:
        return b"".join(b"".join(parts) for parts in self.writes)


async def connect(app: Any, request: bytes) -> RecordingTransport:
    """The gateway's HTTP protocol on a recording transport, ``request`` received."""
    config = uvicorn.Config(
        app, http=bounded_http(ServerConfig()), lifespan="off", access_log=False
    )
    config.load()
    protocol = config.http_protocol_class(  # type: ignore[call-arg]
        config=config, server_state=ServerState(), app_state={}
    )
    transport = RecordingTransport()
    protocol.connection_made(transport)
    protocol.data_received(request)
    return transport


def answering(*bodies: bytes, pause_s: float = 0.0, length: bool = True) -> Any:
    """An app that answers 200 with ``bodies`` as successive parts, ``pause_s`` before
    each, with a content-length (or chunked)."""

    async def app(scope: dict[str, Any], receive: Send, send: Send) -> None:
        total = str(sum(map(len, bodies))).encode()
        headers = [(b"content-length", total)] if length else []
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        for index, body in enumerate(bodies):
            if pause_s:
                await asyncio.sleep(pause_s)
            more = index < len(bodies) - 1
            await send({"type": "http.response.body", "body": body, "more_body": more})

    return app


async def test_the_head_and_the_body_leave_in_one_write() -> None:
    transport = await connect(answering(b'{"id": "1"}'), GET)
    await asyncio.sleep(0.05)
    assert len(transport.writes) == 1
    head, body = transport.writes[0]
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"content-length: 11\r\n" in head
    assert head.endswith(b"\r\n\r\n")
    assert body == b'{"id": "1"}'


async def test_a_streamed_body_sends_its_first_part_with_the_head_and_the_rest_alone() -> None:
    transport = await connect(answering(b"a" * 10, b"b" * 5, length=False), GET)
    await asyncio.sleep(0.05)
    assert [len(parts) for parts in transport.writes] == [2, 1]
    assert transport.writes[0][1] == b"a\r\naaaaaaaaaa\r\n"
    assert transport.sent.endswith(b"5\r\nbbbbb\r\n0\r\n\r\n")


async def test_a_head_whose_body_waits_is_not_held_back() -> None:
    """A stream (server-sent events) sends its head, then waits for news: its caller sees
    the headers at once, not with the first event."""
    transport = await connect(answering(b"event", pause_s=0.3), GET)
    await asyncio.sleep(0.05)
    assert len(transport.writes) == 1
    assert transport.sent.startswith(b"HTTP/1.1 200 OK\r\n")
    assert transport.sent.endswith(b"\r\n\r\n")
    await asyncio.sleep(0.4)
    assert transport.writes[1:] == [[b"event"]]


async def test_a_head_request_gets_the_head_alone() -> None:
    transport = await connect(answering(b"unsent"), b"HEAD / HTTP/1.1\r\nhost: gateway\r\n\r\n")
    await asyncio.sleep(0.05)
    assert len(transport.writes) == 1
    assert transport.sent.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"unsent" not in transport.sent


async def test_a_closing_connection_gets_the_whole_answer_before_it_closes() -> None:
    request = b"GET / HTTP/1.1\r\nhost: gateway\r\nconnection: close\r\n\r\n"
    transport = await connect(answering(b"bye"), request)
    await asyncio.sleep(0.05)
    assert transport.closed
    assert b"connection: close\r\n" in transport.sent
    assert transport.sent.endswith(b"\r\n\r\nbye")
