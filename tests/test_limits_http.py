"""Bounds on what one connection may cost, on raw sockets against the gateway as deployed
(``mjgate serve``, and gunicorn with ``deploy/gunicorn.conf.py``): request headers above
``server.max_header_bytes`` get 431, headers slower than ``server.header_timeout_s`` get 408,
a body slower than ``server.body_timeout_s`` gets 408, and each of these closes the
connection. Nothing of such a request reaches an upstream."""

from __future__ import annotations

import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.rawhttp import Reply, exchange, request_bytes
from tests.support import CALLER_KEYS, SimProcess
from tests.test_observability import GatewayProc, config_data, gateway_proc

MAX_HEADER_BYTES = 4096
HEADER_TIMEOUT_S = 1.0
BODY_TIMEOUT_S = 1.0
KEY = ("mj-api-secret", CALLER_KEYS["alice"])


def bounded_config(sims: list[SimProcess]) -> dict[str, Any]:
    server = {
        "max_header_bytes": MAX_HEADER_BYTES,
        "header_timeout_s": HEADER_TIMEOUT_S,
        "body_timeout_s": BODY_TIMEOUT_S,
    }
    return config_data(sims, server=server)


@pytest.fixture(scope="module")
def gateway(
    session_sims: list[SimProcess], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[GatewayProc]:
    with gateway_proc(tmp_path_factory.mktemp("limits"), bounded_config(session_sims)) as proc:
        yield proc


def port_of(gateway: GatewayProc) -> int:
    return int(gateway.url.rsplit(":", 1)[1])


def upstream_requests(sims: list[SimProcess]) -> int:
    return sum(int(sim.stats()["total"]) for sim in sims)


def padding(size: int) -> tuple[str, str]:
    return ("X-Padding", "p" * size)


def assert_refused(reply: Reply, status: int, description: str) -> None:
    """mjgate's JSON error on a connection the gateway then closed."""
    assert reply.status == status, reply
    assert reply.header("content-type") == "application/json"
    body = reply.json()
    assert body["description"] == description
    assert body["result"] is None and body["request_id"] == reply.header("x-request-id")
    assert reply.closed


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


TOO_LARGE = f"request headers are larger than {MAX_HEADER_BYTES} bytes"
HEADERS_LATE = f"request headers did not arrive within {HEADER_TIMEOUT_S:g} s"
BODY_LATE = f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"


@pytest.mark.parametrize("pieces", [1, 8], ids=["at-once", "in-pieces"])
def test_headers_over_the_bound_get_431_and_reach_no_upstream(
    gateway: GatewayProc, session_sims: list[SimProcess], pieces: int
) -> None:
    before = upstream_requests(session_sims)
    data = request_bytes("GET", "/mj/task/list", [KEY, padding(MAX_HEADER_BYTES)])
    size = -(-len(data) // pieces)
    parts = [data[i : i + size] for i in range(0, len(data), size)]
    reply = exchange(port_of(gateway), parts, pause_s=0.05)
    assert_refused(reply, 431, TOO_LARGE)
    assert reply.seconds < HEADER_TIMEOUT_S  # refused as the bytes came, not at a timeout
    assert upstream_requests(session_sims) == before
    assert gateway.events("request_refused", status=431, request_id=reply.json()["request_id"])


def test_headers_within_the_bound_are_served(gateway: GatewayProc) -> None:
    data = request_bytes("GET", "/mj/task/list", [KEY, padding(MAX_HEADER_BYTES - 200)])
    assert exchange(port_of(gateway), data).status == 200


def test_unfinished_huge_headers_are_cut_off_without_growing_memory(gateway: GatewayProc) -> None:
    """Forty callers each start 1 MiB of headers and never finish: each is refused after a few
    KiB and closed, instead of 40 MiB being read and kept for as long as they like."""
    head = b"GET /mj/task/list HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Padding: "
    chunk = b"p" * 65536
    baseline = rss_kib(gateway.proc.pid)
    sockets = [socket.create_connection(("127.0.0.1", port_of(gateway))) for _ in range(40)]
    try:
        refused = 0
        for sock in sockets:
            sock.settimeout(5)
            try:
                sock.sendall(head)
                for _ in range(16):
                    sock.sendall(chunk)
            except OSError:
                pass  # cut off mid-send: what we are here for
            try:
                refused += sock.recv(64).startswith(b"HTTP/1.1 431 ")
            except ConnectionError:
                refused += 1  # reset after the 431, since we were still sending
        grown_kib = rss_kib(gateway.proc.pid) - baseline
    finally:
        for sock in sockets:
            sock.close()
    assert refused == len(sockets)
    assert grown_kib < 16 * 1024, f"RSS grew by {grown_kib} KiB"


@pytest.mark.parametrize("drip", [False, True], ids=["stalled", "dripping"])
def test_headers_slower_than_the_timeout_get_408(
    gateway: GatewayProc, session_sims: list[SimProcess], drip: bool
) -> None:
    """A half-sent request, stalled or dripping a byte at a time (slowloris): the time counts
    from the request's first byte, and arriving bytes do not extend it."""
    before = upstream_requests(session_sims)
    data = request_bytes("GET", "/mj/task/list", [KEY, padding(200)])[:-4]
    parts = [data[:20], *(bytes([b]) for b in data[20:60])] if drip else [data]
    reply = exchange(port_of(gateway), parts, pause_s=0.1, timeout_s=10)
    assert_refused(reply, 408, HEADERS_LATE)
    assert HEADER_TIMEOUT_S * 0.9 < reply.seconds < HEADER_TIMEOUT_S + 2
    assert upstream_requests(session_sims) == before


def test_a_connection_that_sends_nothing_is_closed(gateway: GatewayProc) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) as sock:
        assert sock.recv(1024) == b""  # closed, with nothing to answer
    assert HEADER_TIMEOUT_S * 0.9 < time.monotonic() - started < HEADER_TIMEOUT_S + 2


def test_an_idle_keep_alive_connection_is_not_a_slow_request(gateway: GatewayProc) -> None:
    """Between two requests the keep-alive timeout applies: a pause longer than the header
    timeout before the next request is fine."""
    request = request_bytes("GET", "/healthz")
    with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) as sock:
        for _ in range(2):
            sock.sendall(request)
            assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
            time.sleep(HEADER_TIMEOUT_S * 1.5)


def test_slow_headers_of_a_later_request_count_from_that_request(gateway: GatewayProc) -> None:
    """The header clock restarts with each request on a kept-alive connection: a request
    begun half a timeout after the connection still has its whole timeout, and no more."""
    with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) as sock:
        sock.sendall(request_bytes("GET", "/healthz"))
        assert read_answer(sock).startswith(b"HTTP/1.1 200 ")
        time.sleep(HEADER_TIMEOUT_S * 0.6)
        began = time.monotonic()
        sock.sendall(request_bytes("GET", "/mj/task/list", [KEY])[:-4])
        reply = sock.recv(65536)
        waited = time.monotonic() - began
    assert reply.startswith(b"HTTP/1.1 408 "), reply
    assert HEADER_TIMEOUT_S * 0.9 < waited < HEADER_TIMEOUT_S + 2


def test_a_pipelined_request_over_the_header_bound_gets_431(gateway: GatewayProc) -> None:
    """Two requests in one write: the second one's headers are measured on their own (the
    refusal closes the connection at once, so the first may go unanswered)."""
    first = request_bytes("GET", "/healthz")
    second = request_bytes("GET", "/mj/task/list", [KEY, padding(MAX_HEADER_BYTES)])
    received = b""
    with socket.create_connection(("127.0.0.1", port_of(gateway)), timeout=10) as sock:
        sock.sendall(first + second)
        while chunk := sock.recv(65536):
            received += chunk
    assert b"HTTP/1.1 431 " in received, received


def read_answer(sock: socket.socket) -> bytes:
    """One whole answer with a ``Content-Length`` body, read from a kept-alive connection."""
    answer = b""
    while b"\r\n\r\n" not in answer:
        answer += sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    length = re.search(rb"content-length: (\d+)", head, re.IGNORECASE)
    assert length is not None, head
    while len(body) < int(length.group(1)):
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("drip", [False, True], ids=["never-sent", "dripping"])
def test_a_body_slower_than_the_timeout_gets_408(
    gateway: GatewayProc, session_sims: list[SimProcess], drip: bool
) -> None:
    """``Content-Length`` promises 200 bytes; 10 come, then nothing (or one every 0.1 s)."""
    before = upstream_requests(session_sims)
    request_id = f"body-{uuid.uuid4().hex[:12]}"
    headers = [KEY, ("X-Request-Id", request_id), ("Content-Type", "application/json")]
    head = request_bytes("POST", "/mj/task/list-by-ids", [*headers, ("Content-Length", "200")])
    parts = [head + b'{"ids": [', *([b" "] * 30 if drip else [])]
    reply = exchange(port_of(gateway), parts, pause_s=0.1, timeout_s=10)
    assert_refused(reply, 408, BODY_LATE)
    assert reply.header("x-request-id") == request_id
    assert BODY_TIMEOUT_S * 0.9 < reply.seconds < BODY_TIMEOUT_S + 2
    line = gateway.wait_for_line(request_id)
    assert (line["status"], line["route"], line["client"]) == (408, "/mj/task/list-by-ids", "alice")
    assert upstream_requests(session_sims) == before


def test_a_caller_hanging_up_mid_body_is_logged_as_499_not_as_a_gateway_error(
    gateway: GatewayProc,
) -> None:
    request_id = f"gone-{uuid.uuid4().hex[:12]}"
    head = request_bytes(
        "POST", "/mj/submit/imagine", [KEY, ("X-Request-Id", request_id), ("Content-Length", "99")]
    )
    with socket.create_connection(("127.0.0.1", port_of(gateway))) as sock:
        sock.sendall(head + b'{"prompt": ')
        time.sleep(0.2)
    line = gateway.wait_for_line(request_id)
    assert (line["status"], line["route"]) == (499, "/mj/submit/{kind}")
    assert not [e for e in gateway.events("unhandled_error") if e.get("request_id") == request_id]


@pytest.mark.parametrize(
    "data",
    [b"GET /mj/task/list HTTP/9.9\r\n\r\n", b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n"],
    ids=["version", "nul"],
)
def test_a_request_that_cannot_be_parsed_gets_400_json(gateway: GatewayProc, data: bytes) -> None:
    assert_refused(exchange(port_of(gateway), data), 400, "malformed HTTP request")


def test_gunicorn_workers_keep_the_same_bounds(
    session_sims: list[SimProcess], tmp_path: Path
) -> None:
    with gateway_proc(tmp_path, bounded_config(session_sims), workers=2) as gunicorn:
        port = port_of(gunicorn)
        oversize = request_bytes("GET", "/mj/task/list", [KEY, padding(MAX_HEADER_BYTES)])
        assert_refused(exchange(port, oversize), 431, TOO_LARGE)
        stalled = request_bytes("GET", "/mj/task/list", [KEY])[:-4]
        assert_refused(exchange(port, stalled, timeout_s=10), 408, HEADERS_LATE)
        head = request_bytes("POST", "/mj/task/list-by-ids", [KEY, ("Content-Length", "50")])
        assert_refused(exchange(port, head + b"{", timeout_s=10), 408, BODY_LATE)
        fine = request_bytes("GET", "/mj/task/list", [KEY, padding(MAX_HEADER_BYTES - 200)])
        assert exchange(port, fine).status == 200
