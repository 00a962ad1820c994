"""gateway/transport.py: httpx requests sent over one aiohttp session, against a real sim
and real sockets: what is sent, what comes back (read, raw, not decompressed, cut past the
size cap), connections pooled only when an answer was read whole, and aiohttp's own
errors."""

from __future__ import annotations

import asyncio
import gzip
import socket
import uuid
from collections.abc import AsyncIterator

import aiohttp
import httpx
import orjson
import pytest

from gateway.transport import AiohttpTransport, raw_body
from tests.support import SimProcess, free_port

TIMEOUT = httpx.Timeout(5.0)
CAP = 8 * 1024 * 1024


@pytest.fixture
async def transport() -> AsyncIterator[AiohttpTransport]:
    http = AiohttpTransport(aiohttp.ClientSession, TIMEOUT, CAP)
    yield http
    await http.aclose()


def task_id() -> str:
    return f"17{uuid.uuid4().int % 10**14:014d}"


async def test_a_get_answers_the_upstreams_status_headers_and_bytes(
    transport: AiohttpTransport, sims: list[SimProcess]
) -> None:
    http = transport
    sim = sims[0]
    tid = task_id()
    sim.seed(id=tid, status="SUCCESS")
    url = httpx.URL(f"{sim.url}/mj/task/{tid}/fetch")
    headers = [(b"mj-api-secret", sim.key.encode()), (b"x-request-id", b"r-1")]
    response = await http.handle_async_request(httpx.Request("GET", url, headers=headers))
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert orjson.loads(raw_body(response))["id"] == tid
    denied = await http.handle_async_request(httpx.Request("GET", url))
    assert denied.status_code == 401


async def test_a_post_sends_its_body(transport: AiohttpTransport, sims: list[SimProcess]) -> None:
    http = transport
    sim = sims[0]
    tid = task_id()
    sim.seed(id=tid, status="SUCCESS")
    request = httpx.Request(
        "POST",
        f"{sim.url}/mj/task/list-by-condition",
        headers=[(b"mj-api-secret", sim.key.encode()), (b"content-type", b"application/json")],
        content=orjson.dumps({"ids": [tid]}),
    )
    response = await http.handle_async_request(request)
    assert [task["id"] for task in orjson.loads(raw_body(response))] == [tid]


async def test_connections_are_pooled_when_read_whole_and_closed_when_cut() -> None:
    """A body within the cap is read to its end and leaves the connection to the pool; a
    longer one is cut one byte past the cap and closes it (it could never carry another
    answer)."""
    body = b"x" * (4 * 1024 * 1024)
    connections = 0

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        head = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(body)
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(head + body)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    url = httpx.URL(f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
    whole = AiohttpTransport(aiohttp.ClientSession, TIMEOUT, len(body))
    cut = AiohttpTransport(aiohttp.ClientSession, TIMEOUT, 1000)
    try:
        for _ in range(3):
            response = await whole.handle_async_request(httpx.Request("GET", url))
            assert raw_body(response) == body
        assert connections == 1
        for expected in (2, 3):
            response = await cut.handle_async_request(httpx.Request("GET", url))
            assert raw_body(response) == body[:1001]
            assert connections == expected
        await whole.handle_async_request(httpx.Request("GET", url))
        assert connections == 3
    finally:
        await whole.aclose()
        await cut.aclose()
        server.close()


async def test_an_encoded_answer_comes_back_raw() -> None:
    """No decompression here: ``gateway.upstreams`` inflates under its own size cap."""
    body = gzip.compress(b'{"id": "1"}')

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = b"HTTP/1.1 200 OK\r\ncontent-encoding: gzip\r\ncontent-length: %d\r\n\r\n"
        writer.write(head % len(body) + body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    http = AiohttpTransport(aiohttp.ClientSession, TIMEOUT, CAP)
    try:
        request = httpx.Request("GET", f"http://127.0.0.1:{port}/")
        assert raw_body(await http.handle_async_request(request)) == body
    finally:
        await http.aclose()
        server.close()


async def test_a_refused_connection_raises_aiohttps_own_error() -> None:
    port = free_port()
    with socket.socket() as sock:  # nothing listens on the port
        sock.bind(("127.0.0.1", port))
    http = AiohttpTransport(aiohttp.ClientSession, TIMEOUT, CAP)
    try:
        with pytest.raises(aiohttp.ClientConnectorError):
            await http.handle_async_request(httpx.Request("GET", f"http://127.0.0.1:{port}/"))
    finally:
        await http.aclose()
