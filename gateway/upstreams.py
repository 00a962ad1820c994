"""Upstream providers: one HTTP client each, key injection, and picking one for a submit."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Coroutine, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp
import httpx
from httpx_aiohttp import AiohttpTransport

from gateway.circuit import CircuitBreaker
from gateway.config import UpstreamConfig
from gateway.context import RequestInfo
from gateway.errors import FailureKind, Saturated, UpstreamError, UpstreamFailures
from gateway.metrics import UPSTREAM_DURATION, UPSTREAM_REQUESTS
from gateway.outbound import OutboundCaps

__all__ = [
    "Upstream",
    "UpstreamPool",
    "UpstreamResponse",
    "call",
    "failed_answer",
    "gather_within",
    "missed_deadline",
]

T = TypeVar("T")
# Fan-out calls time out at the deadline on their own; the fan-out waits this much longer.
FANOUT_GRACE_S = 0.25

# Caller headers worth passing on. Everything else is dropped, the caller's own credentials
# and hop-by-hop headers included: an allow-list cannot leak a header nobody thought of.
FORWARDED_HEADERS = frozenset({"accept-language", "user-agent"})


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """An upstream's answer, body unread by anyone but us: forwarded as these exact bytes."""

    upstream: str
    status: int
    content: bytes
    content_type: str
    elapsed_s: float


class Upstream:
    """One provider. Holds its key and adds it to every request in the provider's style."""

    def __init__(
        self,
        config: UpstreamConfig,
        caps: OutboundCaps,
        breaker: CircuitBreaker,
    ) -> None:
        self.config = config
        self.name = config.name
        self.caps = caps
        self.breaker = breaker
        limits = httpx.Limits(
            max_connections=config.max_concurrency,
            max_keepalive_connections=config.max_concurrency,
            keepalive_expiry=30.0,
        )
        key = config.key.reveal()
        self._auth_header = (
            ("authorization", f"Bearer {key}")
            if config.auth == "bearer"
            else ("mj-api-secret", key)
        )
        self._client = httpx.AsyncClient(
            base_url=config.base_url,
            transport=AiohttpTransport(limits=limits, trust_env=False),
            timeout=httpx.Timeout(config.timeout_s, connect=min(config.timeout_s, 5.0)),
            follow_redirects=False,
            trust_env=False,
        )

    def __repr__(self) -> str:
        return f"<Upstream {self.name}>"

    async def request(
        self,
        method: str,
        path: str,
        *,
        route: str,
        request_id: str,
        body: bytes | None = None,
        caller_headers: Iterable[tuple[str, str]] = (),
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; raise UpstreamError when no HTTP answer came back.

        The circuit breaker and the outbound caps come first; a request they hold back
        fails fast as not sent.
        """
        headers = [(k, v) for k, v in caller_headers if k in FORWARDED_HEADERS]
        headers += [("accept", "application/json"), ("x-request-id", request_id), self._auth_header]
        if body is not None:
            headers.append(("content-type", "application/json"))
        try:
            response = await self._guarded(method, path, headers, body, timeout_s)
        except UpstreamError as exc:
            UPSTREAM_REQUESTS.labels(self.name, route, exc.kind).inc()
            raise
        outcome = "ok" if response.status < 500 and response.status != 429 else "http_error"
        UPSTREAM_REQUESTS.labels(self.name, route, outcome).inc()
        UPSTREAM_DURATION.labels(self.name, route).observe(response.elapsed_s)
        return response

    async def _guarded(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timeout_s: float | None,
    ) -> UpstreamResponse:
        """``_send`` behind the circuit breaker and the outbound caps."""
        if not self.breaker.allow():
            detail = "circuit open after repeated failures; not called until it recovers"
            raise UpstreamError(self.name, "open", False, detail)
        try:
            holder = await self.caps.acquire()
        except Saturated:
            self.breaker.release_probe()
            detail = (
                f"saturated: more than {self.config.max_rps:g} requests/s or "
                f"{self.config.max_concurrency} in flight for {self.config.queue_timeout_s:g} s"
            )
            raise UpstreamError(self.name, "saturated", False, detail) from None
        try:
            response = await self._send(method, path, headers, body, timeout_s)
        finally:
            self.breaker.release_probe()
            await self.caps.release(holder)
        if response.status >= 500:
            self.breaker.failure()
        else:
            self.breaker.success()
        return response

    async def _send(
        self,
        method: str,
        path: str,
        headers: list[tuple[str, str]],
        body: bytes | None,
        timeout_s: float | None,
    ) -> UpstreamResponse:
        started = time.perf_counter()
        try:
            limit = min(timeout_s, self.config.timeout_s) if timeout_s else self.config.timeout_s
            async with asyncio.timeout(limit):
                response = await self._client.request(method, path, content=body, headers=headers)
        except (httpx.HTTPError, TimeoutError) as exc:
            kind, sent = _classify(exc)
            self.breaker.failure()
            raise UpstreamError(self.name, kind, sent, _describe(kind, sent)) from None
        return UpstreamResponse(
            upstream=self.name,
            status=response.status_code,
            content=response.content,
            content_type=response.headers.get("content-type", "application/json"),
            elapsed_s=time.perf_counter() - started,
        )

    async def aclose(self) -> None:
        await self._client.aclose()


def _classify(exc: BaseException) -> tuple[FailureKind, bool]:
    """What went wrong and whether the request may have reached the upstream.

    The aiohttp transport maps several aiohttp errors onto one httpx class (a server that
    hung up after reading the request becomes ``ConnectTimeout``), so judge by the cause.
    """
    if isinstance(exc, TimeoutError):
        return "timeout", True
    cause = exc.__cause__
    if isinstance(cause, aiohttp.ClientConnectorError):
        return "connect", False
    if isinstance(cause, aiohttp.ConnectionTimeoutError):
        return "timeout", False
    if isinstance(cause, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return "timeout", True
    if cause is None or not isinstance(cause, aiohttp.ClientError):
        if isinstance(exc, httpx.ConnectError):
            return "connect", False
        if isinstance(exc, httpx.ConnectTimeout | httpx.PoolTimeout):
            return "timeout", False
        if isinstance(exc, httpx.TimeoutException):
            return "timeout", True
    return "broken", True


def _describe(kind: FailureKind, sent: bool) -> str:
    if kind == "connect":
        return "connection refused or unreachable"
    if kind == "timeout":
        return "timed out after the request was sent" if sent else "timed out connecting"
    return "connection broke before a complete answer"


def forwardable(raw: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    """The caller's headers that may go upstream, from raw ASGI headers."""
    return [
        (name.decode("latin-1"), value.decode("latin-1"))
        for name, value in raw
        if name.decode("latin-1") in FORWARDED_HEADERS
    ]


class UpstreamPool:
    """All configured upstreams, in config order."""

    def __init__(self, upstreams: Sequence[Upstream], rng: random.Random | None = None) -> None:
        self.all: tuple[Upstream, ...] = tuple(upstreams)
        self._rng = rng or random.Random()
        self._allowed: dict[tuple[str, ...], tuple[Upstream, ...]] = {}
        self._names: dict[tuple[Upstream, ...], frozenset[str]] = {}

    def allowed(self, names: tuple[str, ...] | None) -> tuple[Upstream, ...]:
        """The upstreams a caller with this allow-list may reach (None: all of them)."""
        if names is None:
            return self.all
        allowed = self._allowed.get(names)
        if allowed is None:
            allowed = self._allowed[names] = tuple(u for u in self.all if u.name in names)
        return allowed

    def names(self, upstreams: tuple[Upstream, ...]) -> frozenset[str]:
        """The names of a set of upstreams (memoized: callers ask on every request)."""
        names = self._names.get(upstreams)
        if names is None:
            names = self._names[upstreams] = frozenset(u.name for u in upstreams)
        return names

    def submit_order(self, candidates: Sequence[Upstream]) -> list[Upstream]:
        """Candidates in the order to try a submit: by weight, open circuits last.

        Weighted sampling without replacement, so a refused submit moves on to another
        upstream in proportion to the weights that remain. Weight 0 means lookups only.
        """
        ready = [u for u in candidates if u.config.weight > 0 and not u.breaker.is_open]
        tripped = [u for u in candidates if u.config.weight > 0 and u.breaker.is_open]
        return self._weighted(ready) + self._weighted(tripped)

    def _weighted(self, upstreams: list[Upstream]) -> list[Upstream]:
        # Efraimidis-Spirakis: sort by u^(1/w), one pass, exact weighted order.
        keyed = [(self._rng.random() ** (1.0 / u.config.weight), u) for u in upstreams]
        keyed.sort(key=lambda pair: pair[0], reverse=True)
        return [u for _, u in keyed]

    async def aclose(self) -> None:
        await asyncio.gather(*(u.aclose() for u in self.all), return_exceptions=True)


async def call(
    upstream: Upstream,
    info: RequestInfo,
    route: str,
    method: str,
    path: str,
    body: bytes | None = None,
    timeout_s: float | None = None,
) -> UpstreamResponse:
    """One upstream request on behalf of a caller, noted in the request's log facts.

    The gateway's own key being refused (401/403) is an upstream failure, not an answer
    for the caller, who presented a valid key of their own; nothing was taken, so it counts
    as not sent and a submit may move on to another upstream.
    """
    info.upstreams.append(upstream.name)
    response = await upstream.request(
        method,
        path,
        route=route,
        request_id=info.request_id,
        body=body,
        caller_headers=forwardable(info.headers),
        timeout_s=timeout_s,
    )
    info.upstream_ms += response.elapsed_s * 1000
    if response.status in (401, 403):
        detail = f"rejected the gateway's key (HTTP {response.status}); check its key in config"
        raise UpstreamError(upstream.name, "broken", False, detail)
    return response


def failed_answer(response: UpstreamResponse) -> UpstreamError | None:
    """An HTTP answer that says the upstream could not serve, as opposed to an answer."""
    if response.status == 429 or response.status >= 500:
        return UpstreamError(response.upstream, "broken", True, f"answered HTTP {response.status}")
    return None


async def gather_within(
    deadline_s: float, calls: Sequence[tuple[Upstream, Coroutine[Any, Any, T]]]
) -> list[T | UpstreamFailures]:
    """Run one call per upstream concurrently; a call that fails or misses the deadline
    becomes an UpstreamFailures naming every error it met. The calls are expected to time
    out by themselves at the deadline (so that the upstream's circuit hears of it); this
    wait is the safety net."""
    jobs = [asyncio.create_task(coroutine) for _, coroutine in calls]
    if not jobs:
        return []
    _, late = await asyncio.wait(jobs, timeout=deadline_s + FANOUT_GRACE_S)
    for job in late:
        job.cancel()
    outcomes: list[T | UpstreamFailures] = []
    for (upstream, _), job in zip(calls, jobs, strict=True):
        if job in late:
            outcomes.append(UpstreamFailures([missed_deadline(upstream)]))
        elif isinstance(exc := job.exception(), UpstreamError):
            outcomes.append(UpstreamFailures([exc]))
        elif isinstance(exc, UpstreamFailures):
            outcomes.append(exc)
        elif exc is not None:
            raise exc
        else:
            outcomes.append(job.result())
    return outcomes


def missed_deadline(upstream: Upstream) -> UpstreamError:
    """The error of an upstream that had not answered when the fan-out's deadline passed."""
    return UpstreamError(upstream.name, "timeout", True, "missed the fan-out deadline")
