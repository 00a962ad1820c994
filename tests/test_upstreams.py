"""Upstream and UpstreamPool against real sockets and real sims.

Key injection per auth style, the caller-header allow-list, how failures are classified
(whether a request may have reached the upstream decides whether a submit may be repeated),
and the weighted submit order. Each Upstream gets its own in-memory outbound caps and
circuit breaker, as the app builds them.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from gateway.circuit import CircuitBreaker
from gateway.config import Secret, UpstreamConfig
from gateway.context import RequestInfo
from gateway.errors import UpstreamError
from gateway.outbound import OutboundCaps
from gateway.store import KeySpace, MemoryStore
from gateway.upstreams import Upstream, UpstreamPool, call
from tests.sims_extra import total
from tests.support import CALLER_KEYS, SimProcess, free_port

CALLER_HEADERS = [
    (b"authorization", f"Bearer {CALLER_KEYS['alice']}".encode()),
    (b"mj-api-secret", CALLER_KEYS["alice"].encode()),
    (b"cookie", b"session=hop-marker"),
    (b"connection", b"keep-alive, hop-marker"),
    (b"keep-alive", b"timeout=5, hop-marker"),
    (b"te", b"hop-marker"),
    (b"upgrade", b"hop-marker"),
    (b"proxy-authorization", b"Basic hop-marker"),
    (b"x-custom", b"hop-marker"),
    (b"x-forwarded-for", b"hop-marker"),
    (b"accept-language", b"de-CH"),
]


FETCH_PATH = "/mj/task/1/fetch"


def upstream_config(
    name: str,
    base_url: str,
    *,
    auth: str = "mj-api-secret",
    key: str = "some-upstream-key",
    weight: float = 1.0,
    timeout_s: float = 5.0,
    max_concurrency: int = 32,
    queue_timeout_s: float = 2.0,
    max_response_bytes: int = 8 * 1024 * 1024,
) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        base_url=base_url,
        auth="bearer" if auth == "bearer" else "mj-api-secret",
        key=Secret(key),
        weight=weight,
        timeout_s=timeout_s,
        max_concurrency=max_concurrency,
        queue_timeout_s=queue_timeout_s,
        max_response_bytes=max_response_bytes,
    )


def make_upstream(
    config: UpstreamConfig, failure_threshold: int = 5, secrets: tuple[str, ...] = ()
) -> Upstream:
    caps = OutboundCaps(MemoryStore(), KeySpace("t-upstreams"), config)
    return Upstream(config, caps, CircuitBreaker(failure_threshold, 30.0), secrets)


def for_sim(sim: SimProcess, **overrides: Any) -> UpstreamConfig:
    return upstream_config(sim.name, sim.url, auth=sim.gateway_auth, key=sim.key, **overrides)


@asynccontextmanager
async def opened(
    config: UpstreamConfig, failure_threshold: int = 5, secrets: tuple[str, ...] = ()
) -> AsyncIterator[Upstream]:
    upstream = make_upstream(config, failure_threshold, secrets)
    try:
        yield upstream
    finally:
        await upstream.aclose()


def last_headers(sim: SimProcess) -> dict[str, str]:
    headers: list[dict[str, str]] = sim.stats()["headers"]
    assert headers, f"{sim.name} recorded no request"
    return headers[-1]


# -- key injection and the header allow-list ------------------------------------------------


@pytest.mark.parametrize("index", [0, 1, 2], ids=["java", "csharp", "relay"])
async def test_upstream_gets_its_own_key_in_its_own_style(
    sims: list[SimProcess], index: int
) -> None:
    sim = sims[index]
    sim.seed(id="1700000000000001", prompt="key injection")
    async with opened(for_sim(sim)) as upstream:
        response = await upstream.request(
            "GET",
            "/mj/task/1700000000000001/fetch",
            route="fetch",
            request_id="req-upstream-1",
            caller_headers=CALLER_HEADERS,
        )
    # The sim checks the key: a 200 with the task means it was accepted.
    assert response.status == 200, response.content
    assert b"key injection" in response.content
    assert response.upstream == sim.name

    seen = last_headers(sim)
    if sim.gateway_auth == "bearer":
        assert seen.get("authorization") == f"Bearer {sim.key}"
        assert "mj-api-secret" not in seen
    else:
        assert seen.get("mj-api-secret") == sim.key
        # The C# upstream reads Authorization raw first: a stray one would break it.
        assert "authorization" not in seen
    assert seen.get("x-request-id") == "req-upstream-1"
    assert seen.get("accept-language") == "de-CH"  # on the allow-list
    for name in ("cookie", "keep-alive", "te", "upgrade", "proxy-authorization", "x-custom"):
        assert name not in seen, f"{name} was forwarded to {sim.name}"
    assert "x-forwarded-for" not in seen
    for name, value in seen.items():
        assert "hop-marker" not in value, f"caller's {name} leaked to {sim.name}"
        assert CALLER_KEYS["alice"] not in value


async def test_body_is_sent_as_json_with_content_type(sims: list[SimProcess]) -> None:
    relay = sims[2]
    async with opened(for_sim(relay)) as upstream:
        response = await upstream.request(
            "POST",
            "/mj/submit/imagine",
            route="submit",
            request_id="req-upstream-2",
            body=b'{"prompt":"a json body"}',
        )
    assert response.status == 200
    assert response.content_type.startswith("application/json")
    assert relay.stats()["submits"] == 1
    assert last_headers(relay).get("content-type") == "application/json"


async def test_wrong_key_is_an_upstream_failure_that_does_not_leak_the_key(
    sims: list[SimProcess],
) -> None:
    java = sims[0]
    secret = "the-wrong-upstream-key-xyz"
    config = upstream_config(java.name, java.url, key=secret)
    async with opened(config) as upstream:
        response = await upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r1")
        assert response.status == 401  # the Java upstream's empty 401
        with pytest.raises(UpstreamError) as caught:
            info = RequestInfo(request_id="r2")
            await call(upstream, info, "fetch", "GET", "/mj/task/1/fetch")
    error = caught.value
    assert error.upstream == java.name
    assert error.kind == "broken"
    # Refused before any work: a submit may move on to another upstream.
    assert error.sent is False
    assert secret not in str(error)
    assert secret not in repr(upstream)


@pytest.mark.parametrize("status", [401, 403])
async def test_a_rejected_key_counts_against_the_circuit_and_opens_it(
    sims: list[SimProcess], status: int
) -> None:
    java = sims[0]
    java.faults(error_rate=1, error_status=status)
    async with opened(for_sim(java), failure_threshold=3) as upstream:
        for _ in range(3):
            answer = await upstream.request(
                "GET", "/mj/task/1/fetch", route="fetch", request_id="r"
            )
            assert answer.status == status
        assert upstream.breaker.state == "open"
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("POST", "/mj/submit/imagine", route="submit", request_id="r")
    assert (caught.value.kind, caught.value.sent) == ("open", False)
    assert total(java) == 3


# -- failure classification ------------------------------------------------------------------


async def test_refused_connection_is_connect_and_not_sent() -> None:
    port = free_port()
    secret = "refused-upstream-key-abc"
    config = upstream_config("refusing", f"http://127.0.0.1:{port}", key=secret, timeout_s=3)
    async with opened(config) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.request(
                "POST", "/mj/submit/imagine", route="submit", request_id="r", body=b"{}"
            )
    error = caught.value
    assert (error.upstream, error.kind, error.sent) == ("refusing", "connect", False)
    assert "refusing" in str(error)
    assert str(port) not in str(error)
    assert secret not in str(error)


@pytest.mark.parametrize(
    ("method", "path", "route"),
    [("GET", FETCH_PATH, "fetch"), ("POST", "/mj/submit/imagine", "submit")],
    ids=["pooled-read", "submit-on-its-own-connection"],
)
async def test_hanging_upstream_is_timeout_and_sent(
    sims: list[SimProcess], method: str, path: str, route: str
) -> None:
    java = sims[0]
    java.faults(timeout_rate=1, hang_s=3)
    async with opened(for_sim(java, timeout_s=0.5)) as upstream:
        with pytest.raises(UpstreamError) as caught:
            body = b"{}" if method == "POST" else None
            await upstream.request(method, path, route=route, request_id="r", body=body)
    error = caught.value
    assert (error.upstream, error.kind, error.sent) == (java.name, "timeout", True)
    assert error.description.endswith("timed out after the request was sent")
    # The request did arrive: repeating it elsewhere could buy the same image twice.
    assert java.stats()["total"] == 1


async def test_open_circuit_fails_fast_as_not_sent(sims: list[SimProcess]) -> None:
    java = sims[0]
    java.faults(error_rate=1)
    async with opened(for_sim(java), failure_threshold=2) as upstream:
        for _ in range(2):
            answer = await upstream.request(
                "GET", "/mj/task/1/fetch", route="fetch", request_id="r"
            )
            assert answer.status == 500
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("POST", "/mj/submit/imagine", route="submit", request_id="r")
    # Held back by the gateway: surely never sent, so a submit may move on.
    assert (caught.value.kind, caught.value.sent) == ("open", False)
    assert total(java) == 2


async def test_full_outbound_caps_fail_as_saturated_and_not_sent(sims: list[SimProcess]) -> None:
    java = sims[0]
    java.faults(timeout_rate=1, hang_s=2)
    config = for_sim(java, timeout_s=1, max_concurrency=1, queue_timeout_s=0.2)
    async with opened(config) as upstream:
        first = asyncio.create_task(
            upstream.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r1")
        )
        for _ in range(100):  # until the first request holds the only slot upstream
            if total(java) == 1:
                break
            await asyncio.sleep(0.01)
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("POST", "/mj/submit/imagine", route="submit", request_id="r2")
        with pytest.raises(UpstreamError):
            await first
    assert (caught.value.kind, caught.value.sent) == ("saturated", False)
    assert total(java) == 1


async def test_per_request_timeout_overrides_the_upstream_timeout(sims: list[SimProcess]) -> None:
    java = sims[0]
    java.faults(timeout_rate=1, hang_s=3)
    async with opened(for_sim(java, timeout_s=10)) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.request(
                "GET", "/mj/task/1/fetch", route="fetch", request_id="r", timeout_s=0.3
            )
    assert (caught.value.kind, caught.value.sent) == ("timeout", True)


async def test_the_wait_for_the_outbound_caps_counts_against_the_calls_timeout(
    sims: list[SimProcess],
) -> None:
    """A fan-out's deadline covers its wait for the caps: it used to start after it, so a
    call could overrun the deadline by ``queue_timeout_s``."""
    java = sims[0]
    java.faults(timeout_rate=1, hang_s=3)
    config = for_sim(java, timeout_s=5, max_concurrency=1, queue_timeout_s=3)
    async with opened(config) as upstream:
        first = asyncio.create_task(
            upstream.request("GET", FETCH_PATH, route="fetch", request_id="r1", timeout_s=2)
        )
        for _ in range(100):  # until the first request holds the only slot upstream
            if total(java) == 1:
                break
            await asyncio.sleep(0.01)
        began = time.monotonic()
        with pytest.raises(UpstreamError) as caught:
            await upstream.request("GET", FETCH_PATH, route="fetch", request_id="r2", timeout_s=0.5)
        elapsed = time.monotonic() - began
        with pytest.raises(UpstreamError):
            await first
    assert elapsed < 0.8, f"took {elapsed:.2f} s for a 0.5 s call"
    assert (caught.value.kind, caught.value.sent) == ("saturated", False)
    assert total(java) == 1


@pytest.fixture
def hang_up_server() -> Iterator[int]:
    """A real server that reads a request and closes the connection without answering."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.settimeout(0.2)
    port: int = listener.getsockname()[1]
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            with conn:
                conn.settimeout(2)
                data = b""
                while b"\r\n\r\n" not in data:
                    chunk = conn.recv(4096)
                    if not chunk:
                        break
                    data += chunk

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield port
    stop.set()
    thread.join(timeout=5)
    listener.close()


async def test_connection_dropped_after_request_is_broken_and_sent(hang_up_server: int) -> None:
    config = upstream_config("dropper", f"http://127.0.0.1:{hang_up_server}", timeout_s=3)
    async with opened(config) as upstream:
        with pytest.raises(UpstreamError) as caught:
            await upstream.request(
                "POST", "/mj/submit/imagine", route="submit", request_id="r", body=b"{}"
            )
    # The upstream read the submit, so it may have started the work: never "not sent".
    assert caught.value.sent is True
    assert caught.value.kind in ("broken", "timeout")


# -- weighted submit order -------------------------------------------------------------------


@asynccontextmanager
async def pool_of(
    weights: dict[str, float], rng: random.Random
) -> AsyncIterator[tuple[UpstreamPool, dict[str, Upstream]]]:
    base = f"http://127.0.0.1:{free_port()}"
    upstreams = {
        n: make_upstream(upstream_config(n, base, weight=w), failure_threshold=1)
        for n, w in weights.items()
    }
    pool = UpstreamPool(list(upstreams.values()), rng=rng)
    try:
        yield pool, upstreams
    finally:
        await pool.aclose()


async def test_weight_zero_is_never_picked_for_submits() -> None:
    async with pool_of({"a": 1, "lookups-only": 0, "b": 2}, random.Random(7)) as (pool, _):
        for _ in range(2000):
            order = [u.name for u in pool.submit_order(pool.all)]
            assert sorted(order) == ["a", "b"]  # each positive weight once, zero never
    async with pool_of({"x": 0, "y": 0}, random.Random(7)) as (pool, _):
        assert pool.submit_order(pool.all) == []


async def test_weights_one_to_three_give_a_quarter_of_first_picks() -> None:
    """Over 20,000 draws with a seeded RNG, the weight-3 upstream comes first 75% +- 2%
    of the time (the standard deviation is 0.3%, so +-2% is over six of them)."""
    draws = 20_000
    async with pool_of({"light": 1, "heavy": 3}, random.Random(20240611)) as (pool, _):
        firsts = [pool.submit_order(pool.all)[0].name for _ in range(draws)]
    share = firsts.count("heavy") / draws
    assert share == pytest.approx(0.75, abs=0.02)


async def test_three_weights_first_pick_shares() -> None:
    draws = 20_000
    weights = {"a": 1.0, "b": 2.0, "c": 7.0}
    async with pool_of(weights, random.Random(99)) as (pool, _):
        firsts = [pool.submit_order(pool.all)[0].name for _ in range(draws)]
    for name, weight in weights.items():
        assert firsts.count(name) / draws == pytest.approx(weight / 10, abs=0.02), name


async def test_allowed_restricts_candidates_and_keeps_config_order() -> None:
    async with pool_of({"a": 1, "b": 1, "c": 1}, random.Random(1)) as (pool, _):
        assert [u.name for u in pool.allowed(None)] == ["a", "b", "c"]
        assert [u.name for u in pool.allowed(("c", "a"))] == ["a", "c"]
        allowed = pool.allowed(("b",))
        for _ in range(100):
            assert [u.name for u in pool.submit_order(allowed)] == ["b"]


async def test_upstream_with_an_open_circuit_goes_last_despite_its_weight() -> None:
    async with pool_of({"heavy": 1000, "light": 1}, random.Random(3)) as (pool, upstreams):
        heavy = upstreams["heavy"]
        with pytest.raises(UpstreamError):
            await heavy.request("GET", "/mj/task/1/fetch", route="fetch", request_id="r")
        assert heavy.breaker.is_open  # threshold 1: one refusal opens it
        for _ in range(200):
            assert [u.name for u in pool.submit_order(pool.all)] == ["light", "heavy"]
