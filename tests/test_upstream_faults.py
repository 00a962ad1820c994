"""Upstreams that break, lie or turn hostile, against the real Upstream and the real gateway.

A raw TCP server (``RawUpstream``) sends what no web framework would: a bad status line,
endless headers, a 50 MB body, a gzip bomb, its own key quoted back, a keep-alive connection
closed right after answering. Every such answer must end as that upstream's failure (502/504
or a partial answer), never as the gateway's own 500; an answer is read only up to its cap;
no upstream key reaches a caller, the cache or a log; and a request reported as sent may
really have reached the upstream.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import re
import socket
import threading
import tracemalloc
import zlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import orjson
import pytest
import redis

from gateway.errors import UpstreamError
from tests.sims_extra import (
    assert_error,
    client,
    config_for,
    fresh,
    started,
    unique_id,
)
from tests.support import RedisProcess, SimProcess, free_port, running_gateway
from tests.test_upstreams import opened, upstream_config

Answer = Callable[[bytes], Iterable[bytes]]  # a request's bytes -> the answer's chunks
MIB = 1024 * 1024


class RawUpstream:
    """A real TCP server on loopback, in a thread of its own, answering each request with
    the chunks ``answer`` gives, then closing the connection. With ``drop_reused`` it keeps
    the connection open without saying so and, when the client sends more on it, hangs up
    without reading that: a keep-alive timeout racing the client's next request."""

    def __init__(self, answer: Answer, drop_reused: bool = False) -> None:
        self.answer = answer
        self.drop_reused = drop_reused
        self.requests: list[bytes] = []
        self.bytes_sent = 0
        self.port = free_port()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        serving = asyncio.start_server(self._serve, "127.0.0.1", self.port)
        self._server = asyncio.run_coroutine_threadsafe(serving, self._loop).result(5)

    def stop(self) -> None:
        async def close() -> None:
            assert self._server is not None
            self._server.close()

        asyncio.run_coroutine_threadsafe(close(), self._loop).result(5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.requests.append(head + body)
            for chunk in self.answer(head + body):
                writer.write(chunk)
                await writer.drain()
                self.bytes_sent += len(chunk)
            if self.drop_reused and await reader.read(1):
                writer.transport.abort()
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()


@pytest.fixture
def raw_upstream() -> Iterator[Callable[..., RawUpstream]]:
    """Start RawUpstreams for this test; each is stopped after it."""
    servers: list[RawUpstream] = []

    def start(answer: Answer, drop_reused: bool = False) -> RawUpstream:
        server = RawUpstream(answer, drop_reused)
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()


def always(*chunks: bytes) -> Answer:
    return lambda _: chunks


def http(status: bytes, body: bytes = b"{}", headers: bytes = b"") -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: application/json\r\n" + headers
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


def a_task(task_id: str, **fields: Any) -> bytes:
    return orjson.dumps({"id": task_id, "status": "SUCCESS", "progress": "100%", **fields})


# -- item 17: every protocol breakage is the upstream's failure ---------------------------

BROKEN_ANSWERS = {
    "status-not-a-number": b"HTTP/1.1 abc OK\r\ncontent-length: 2\r\n\r\n{}",
    "status-999": http(b"999 Weird"),
    "status-2-digits": b"HTTP/1.1 42 Weird\r\ncontent-length: 2\r\n\r\n{}",
    "header-of-1-mib": http(b"200 OK", headers=b"x-big: " + b"a" * MIB + b"\r\n"),
    "500-headers": http(b"200 OK", headers=b"".join(b"x-h%d: a\r\n" % i for i in range(500))),
    "not-http": b"\x00\x01\x02 hello\r\n\r\n",
    "short-body": b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\n{}",
    "bad-chunking": b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n{}\r\n0\r\n\r\n",
    "bad-content-length": b"HTTP/1.1 200 OK\r\ncontent-length: abc\r\n\r\n{}",
    "two-content-lengths": b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ncontent-length: 3\r\n\r\n{}",
    "not-gzip": http(b"200 OK", b"abcde", b"content-encoding: gzip\r\n"),
    "unoffered-encoding": http(b"200 OK", b"{}", b"content-encoding: br\r\n"),
    "silence": b"",
}


@pytest.mark.parametrize("answer", list(BROKEN_ANSWERS))
async def test_every_broken_answer_is_the_upstreams_failure(
    raw_upstream: Callable[..., RawUpstream], answer: str
) -> None:
    server = raw_upstream(always(BROKEN_ANSWERS[answer]))
    async with opened(upstream_config("broken", server.url, timeout_s=3)) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r")
        assert upstream.breaker.failures == 1  # counted against its circuit
    error = caught.value
    assert (error.upstream, error.kind, error.sent) == ("broken", "broken", True)
    assert error.status == 502


def broken_beside(java: SimProcess, server: RawUpstream) -> list[dict[str, Any]]:
    broken = {
        "name": "broken",
        "base_url": server.url,
        "auth": "bearer",
        "key": "broken-upstream-key-0042",
        "list_by_ids_path": "/mj/task/list-by-ids",
        "timeout_s": 2,
    }
    return [java.upstream_config(), broken]


@pytest.mark.parametrize("answer", ["status-not-a-number", "header-of-1-mib", "not-http"])
def test_a_broken_upstream_never_breaks_what_another_upstream_answers(
    session_sims: list[SimProcess], raw_upstream: Callable[..., RawUpstream], answer: str
) -> None:
    java = fresh(session_sims)[0]
    server = raw_upstream(always(BROKEN_ANSWERS[answer]))
    known = unique_id()
    java.seed(id=known, prompt="found beside a broken upstream")
    with running_gateway(config_for(broken_beside(java, server))) as gw, client(gw) as http:
        found = http.get(f"/mj/task/{known}/fetch")
        unknown = http.get(f"/mj/task/{unique_id()}/fetch")
        listed = http.post("/mj/task/list-by-ids", json={"ids": [known, unique_id()]})
    assert found.status_code == 200, found.text
    assert found.json()["id"] == known
    # "Not found" is not sure while one upstream could not answer: the broken one's failure.
    assert "upstream broken" in assert_error(unknown, 502)["description"]
    assert listed.status_code == 200, listed.text
    assert [t["id"] for t in listed.json()] == [known]
    assert listed.headers.get("x-gateway-partial") == "broken"
    assert len(server.requests) >= 3


# -- item 18: answers are read up to a cap, decompressed included ------------------------


def endless_json(total: int, chunk: int = 64 * 1024) -> Answer:
    """A 200 whose JSON body is ``total`` bytes, streamed in chunks."""

    def answer(_: bytes) -> Iterator[bytes]:
        yield b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        yield b"content-length: %d\r\n\r\n" % total
        filler = b" " * chunk
        sent = 0
        while sent < total:
            piece = filler[: total - sent]
            yield piece
            sent += len(piece)

    return answer


@functools.cache
def gzip_bomb(inflated: int = 100 * MIB) -> bytes:
    """``inflated`` bytes of spaces, gzipped (about a thousand times smaller)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    block = b" " * MIB
    return b"".join(packer.compress(block) for _ in range(inflated // MIB)) + packer.flush()


def gzipped(body: bytes) -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, zlib.MAX_WBITS | 16)
    return packer.compress(body) + packer.flush()


async def peak_bytes_during(work: Callable[[], Any]) -> int:
    """The most Python memory allocated at once while ``work()`` runs."""
    gc.collect()
    tracemalloc.start()
    try:
        await work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.parametrize("shape", ["50-mb-body", "gzip-bomb"])
async def test_an_answer_past_the_cap_fails_without_being_read_whole(
    raw_upstream: Callable[..., RawUpstream], shape: str
) -> None:
    if shape == "50-mb-body":
        server = raw_upstream(endless_json(50 * MIB))
    else:
        bomb = gzip_bomb()
        server = raw_upstream(always(http(b"200 OK", bomb, b"content-encoding: gzip\r\n")))
    config = upstream_config("huge", server.url, timeout_s=10, max_response_bytes=MIB)
    async with opened(config) as upstream:
        caught: list[UpstreamError] = []

        async def fetch() -> None:
            try:
                await upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r")
            except UpstreamError as exc:
                caught.append(exc)

        peak = await peak_bytes_during(fetch)
    assert len(caught) == 1
    error = caught[0]
    assert (error.kind, error.sent) == ("broken", True)
    assert f"answer larger than {MIB} bytes" in error.description
    # Never buffered whole: a few times the cap at most, not 50 or 100 MB.
    assert peak < 4 * MIB, f"peak {peak / MIB:.1f} MiB"
    if shape == "50-mb-body":
        assert server.bytes_sent < 25 * MIB  # reading stopped; the rest never left


async def test_a_gzipped_answer_under_the_cap_arrives_decompressed(
    raw_upstream: Callable[..., RawUpstream],
) -> None:
    task = a_task("1700000000000123", prompt="x" * 50_000)
    server = raw_upstream(always(http(b"200 OK", gzipped(task), b"content-encoding: gzip\r\n")))
    config = upstream_config("zipped", server.url, max_response_bytes=len(task))
    async with opened(config) as upstream:
        response = await upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r")
    assert response.status == 200
    assert response.content == task
    assert b"accept-encoding: gzip, deflate" in server.requests[0].lower()


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmRSS:"))
    return int(line.split()[1]) * 1024


def test_the_gateway_stays_small_after_answers_of_50_mb(
    session_sims: list[SimProcess], raw_upstream: Callable[..., RawUpstream]
) -> None:
    java = fresh(session_sims)[0]
    server = raw_upstream(endless_json(50 * MIB))
    config = config_for(broken_beside(java, server), circuit={"failure_threshold": 100})
    with running_gateway(config) as gw, client(gw) as http:
        http.get(f"/mj/task/{unique_id()}/fetch")  # warm up: imports, pools, caches
        gc.collect()
        before = rss_bytes()
        for _ in range(5):
            answer = http.get(f"/mj/task/{unique_id()}/fetch")
            assert "answer larger than" in assert_error(answer, 502)["description"]
        gc.collect()
        after = rss_bytes()
    # 8 MiB cap (the default): whatever was read is freed again.
    assert after - before < 40 * MIB, f"RSS grew {(after - before) / MIB:.0f} MiB"


# -- item 19: no upstream key leaves in an answer ----------------------------------------

KEY = "sk-relay/key-0123456789abcdef"
OTHER_KEY = "sk-other-key-fedcba9876543210"


def echo_keys(request: bytes) -> Iterable[bytes]:
    """Quotes every key it was shown, and another upstream's, in every spelling."""
    presented = re.search(rb"(?i)\r\nauthorization: bearer ([^\r]+)", request)
    assert presented is not None
    key = presented.group(1)
    quoted = orjson.dumps({"error": f"bad key {key.decode()}", "other": OTHER_KEY})
    body = b'{"raw":"%s","escaped":"%s","json":%s}' % (
        key,
        key.replace(b"/", b"\\/"),
        quoted,
    )
    return [http(b"403 Forbidden", body, b"x-echo: " + key + b"\r\n")]


async def test_every_upstream_key_is_masked_in_answers(
    raw_upstream: Callable[..., RawUpstream],
) -> None:
    server = raw_upstream(echo_keys)
    config = upstream_config("echo", server.url, auth="bearer", key=KEY)
    async with opened(config, secrets=(KEY, OTHER_KEY)) as upstream:
        response = await upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r")
    content = response.content
    assert KEY.encode() in server.requests[0]  # it did get the key, and quoted it
    for spelled in (KEY.encode(), KEY.replace("/", "\\/").encode(), OTHER_KEY.encode()):
        assert spelled not in content
    assert orjson.loads(content) == {
        "raw": "***",
        "escaped": "***",
        "json": {"error": "bad key ***", "other": "***"},
    }


@pytest.fixture(scope="module")
def echoing_relay() -> Iterator[SimProcess]:
    relay = SimProcess(
        "echo",
        "relay",
        "echo-relay-upstream-key-77aa",
        "bearer",
        "/mj/task/list-by-ids",
        ("--list-paths", "list-by-ids", "--no-query"),
    )
    with started([relay]):
        relay.faults(echo_key=True)
        yield relay


def stored_values(url: str, pattern: str) -> list[bytes]:
    """Every value, field and member the store holds under keys matching ``pattern``."""
    store: Any = redis.Redis.from_url(url)  # redis-py types every reply as bytes | str
    found: list[bytes] = []
    try:
        for key in store.scan_iter(pattern):
            kind = store.type(key)
            if kind == b"string":
                found.append(store.get(key))
            elif kind == b"hash":
                found += store.hvals(key)
            elif kind == b"list":
                found += store.lrange(key, 0, -1)
            elif kind == b"set":
                found += store.smembers(key)
            elif kind == b"zset":
                found += store.zrange(key, 0, -1)
            elif kind == b"stream":
                found += [v for _, fields in store.xrange(key) for v in fields.values()]
    finally:
        store.close()
    return found


def test_a_relay_quoting_its_key_never_hands_it_to_a_caller_a_cache_or_a_log(
    echoing_relay: SimProcess, redis_server: RedisProcess, capfd: pytest.CaptureFixture[str]
) -> None:
    relay = echoing_relay
    secret = relay.key
    task_id = unique_id()
    relay.seed(id=task_id, prompt=f"made with {secret}")
    config = config_for([relay.upstream_config()], redis_server.url)
    with running_gateway(config) as gw, client(gw) as http:
        fetched = http.get(f"/mj/task/{task_id}/fetch")
        relay.faults(error_rate=1, error_status=400)
        try:
            refused = http.post("/mj/submit/imagine", json={"prompt": "a cat"})
        finally:
            relay.faults(error_rate=0)
    assert fetched.status_code == 200
    assert fetched.json()["prompt"] == "made with ***"
    assert refused.status_code == 400, refused.text
    assert "(key ***)" in refused.json()["description"]  # the relay did quote it
    for answer in (fetched, refused):
        assert secret not in answer.text
    values = stored_values(redis_server.url, f"{config.redis.key_prefix}:*")
    assert any(b"made with ***" in v for v in values)
    assert not any(secret.encode() in v for v in values)
    logged = capfd.readouterr()
    assert secret not in logged.out + logged.err


# -- item 23: "sent" is true -------------------------------------------------------------


async def test_a_submit_after_the_upstream_closed_a_pooled_connection_is_delivered(
    raw_upstream: Callable[..., RawUpstream],
) -> None:
    """The upstream hangs up on a kept-alive connection just as the next request comes. A
    submit that took that connection from the pool failed at once as "maybe sent" (so it
    could not move on to another upstream) though the upstream never read it."""
    server = raw_upstream(always(http(b"200 OK", b'{"code":1,"result":"1"}')), drop_reused=True)
    async with opened(upstream_config("closer", server.url)) as upstream:
        for _ in range(30):
            fetched = await upstream.request(
                "GET", "/mj/task/1/fetch", route="fetch", request_id="r"
            )
            assert fetched.status == 200
            submitted = await upstream.request(
                "POST", "/mj/submit/imagine", route="submit", request_id="r", body=b"{}"
            )
            assert submitted.status == 200
    submits = [r for r in server.requests if r.startswith(b"POST")]
    assert len(submits) == 30  # each exactly once


async def test_a_read_post_on_a_connection_closed_meanwhile_is_sent_again(
    raw_upstream: Callable[..., RawUpstream],
) -> None:
    server = raw_upstream(always(http(b"200 OK", b"[]")), drop_reused=True)
    async with opened(upstream_config("closer", server.url)) as upstream:
        for _ in range(30):
            await upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r")
            listed = await upstream.request(
                "POST", "/mj/task/list-by-ids", route="list_by_ids", request_id="r", body=b"{}"
            )
            assert listed.content == b"[]"
    assert len([r for r in server.requests if r.startswith(b"POST")]) == 30


@pytest.fixture
def unanswered_port() -> Iterator[int]:
    """A port whose accept queue is full: a connection attempt hangs in SYN_SENT."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port: int = listener.getsockname()[1]
    filler = socket.create_connection(("127.0.0.1", port))
    yield port
    filler.close()
    listener.close()


async def test_a_submit_timing_out_while_connecting_is_not_sent(unanswered_port: int) -> None:
    config = upstream_config("unanswered", f"http://127.0.0.1:{unanswered_port}", timeout_s=5)
    async with opened(config) as upstream:
        for timeout_s in (0.2, 0.3):
            with pytest.raises(UpstreamError) as caught:
                await upstream.request(
                    "POST",
                    "/mj/submit/imagine",
                    route="submit",
                    request_id="r",
                    body=b"{}",
                    timeout_s=timeout_s,
                )
            assert (caught.value.kind, caught.value.sent) == ("timeout", False)
            assert "timed out connecting" in caught.value.description
