"""Upstream providers: one HTTP client each, key injection, and picking one for a submit.

An upstream is a stranger. Whatever it sends back (a broken status line, endless headers, a
body that never ends or inflates to gigabytes, its own key quoted in an error) ends as that
upstream's failure or as scrubbed bytes, never as an error of the gateway's own.
"""

from __future__ import annotations

import asyncio
import functools
import random
import ssl
import time
import zlib
from collections.abc import Coroutine, Iterable, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any, TypeVar

import aiohttp
import httpx
import orjson
from prometheus_client import Counter, Histogram

from gateway.circuit import CircuitBreaker
from gateway.config import UpstreamConfig
from gateway.context import RequestInfo
from gateway.errors import FailureKind, Saturated, UpstreamError, UpstreamFailures
from gateway.lru import LRU
from gateway.metrics import UPSTREAM_DURATION, UPSTREAM_REQUESTS
from gateway.outbound import OutboundCaps
from gateway.transport import AiohttpTransport, raw_body

__all__ = [
    "KEY_MASK",
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
FORWARDED_HEADERS = frozenset({b"accept-language", b"user-agent"})
# POST routes that only read: sending one twice buys nothing twice.
READ_ROUTES = frozenset({"list_by_ids", "query"})
# What an upstream key is replaced with wherever an answer quotes it.
KEY_MASK = b"***"
_KEEPALIVE_S = 30.0
_PARSED_URLS = 4096  # per upstream: the paths of the tasks being polled
# How a transport can fail; anything else raised while talking to an upstream is a bug.
_FAILURES = (httpx.HTTPError, aiohttp.ClientError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class UpstreamResponse:
    """An upstream's answer, body unread by anyone but us: forwarded as these exact bytes."""

    upstream: str
    status: int
    content: bytes
    content_type: str
    elapsed_s: float


class _Broken(Exception):
    """An answer that arrived but breaks the protocol or the gateway's bounds."""


class _Progress:
    """Whether a request on a fresh connection got as far as a connection, from aiohttp's
    trace signals: before that, nothing can have reached the upstream."""

    __slots__ = ("connected",)

    def __init__(self) -> None:
        self.connected = False


_PROGRESS: ContextVar[_Progress | None] = ContextVar("mjgate_upstream_progress", default=None)


async def _on_connected(session: aiohttp.ClientSession, context: SimpleNamespace, _: Any) -> None:
    progress = _PROGRESS.get()
    if progress is not None:
        progress.connected = True


class Upstream:
    """One provider. Holds its key and adds it to every request in the provider's style.

    Reads share pooled keep-alive connections. A request that creates work goes out on a
    connection of its own: on a pooled connection the upstream has just closed, a request
    fails without telling whether it arrived, and "maybe sent" forbids trying another
    upstream; a fresh connection tells exactly whether anything could have left.
    """

    def __init__(
        self,
        config: UpstreamConfig,
        caps: OutboundCaps,
        breaker: CircuitBreaker,
        secrets: Iterable[str] = (),
    ) -> None:
        """``secrets``: other upstreams' keys, scrubbed from answers like this one's own."""
        self.config = config
        self.name = config.name
        self.caps = caps
        self.breaker = breaker
        key = config.key.reveal()
        auth = (
            (b"authorization", f"Bearer {key}".encode())
            if config.auth == "bearer"
            else (b"mj-api-secret", key.encode())
        )
        # As bytes: httpx takes bytes as they are, and encodes (and checks) text each time.
        self._fixed_headers = [
            (b"accept", b"application/json"),
            (b"accept-encoding", b"gzip, deflate"),
            auth,
        ]
        forms = {form for k in (key, *secrets) if k for form in _spellings(k)}
        # Longest first, so that a key containing another is masked whole.
        self._secrets = tuple(sorted(forms, key=len, reverse=True))
        self._base_url = config.base_url.rstrip("/")
        timeout_s = config.timeout_s
        self._timeout = httpx.Timeout(timeout_s, connect=min(timeout_s, 5.0))
        self._counters: dict[tuple[str, str], Counter] = {}
        self._timers: dict[str, Histogram] = {}
        # Parsed once per path: httpx parses a URL given as text on every request, and a
        # poll asks for the same few paths again and again.
        self._urls: LRU[str, httpx.URL] = LRU(_PARSED_URLS)
        self._pooled = self._transport(fresh=False)
        self._fresh = self._transport(fresh=True)

    def __repr__(self) -> str:
        return f"<Upstream {self.name}>"

    def _transport(self, fresh: bool) -> AiohttpTransport:
        """An httpx transport over aiohttp, called directly: the client's per-request
        machinery (auth flows, cookies, redirects, hooks, header merging) buys nothing here."""
        limit, tls = self.config.max_concurrency, _tls()

        def session() -> aiohttp.ClientSession:
            # Made on first use, inside the event loop, as aiohttp wants.
            if not fresh:
                pooled = aiohttp.TCPConnector(limit=limit, ssl=tls, keepalive_timeout=_KEEPALIVE_S)
                return aiohttp.ClientSession(connector=pooled)
            trace = aiohttp.TraceConfig()
            trace.on_connection_create_end.append(_on_connected)
            single = aiohttp.TCPConnector(limit=limit, ssl=tls, force_close=True)
            return aiohttp.ClientSession(connector=single, trace_configs=[trace])

        return AiohttpTransport(session, self._timeout, self.config.max_response_bytes)

    async def request(
        self,
        method: str,
        path: str,
        *,
        route: str,
        request_id: str,
        body: bytes | None = None,
        caller_headers: Iterable[tuple[bytes, bytes]] = (),
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Send one request; raise UpstreamError when no usable HTTP answer came back.

        ``timeout_s`` bounds the whole call from now, the wait for the outbound caps
        included (a fan-out's deadline); the upstream's own ``timeout_s`` bounds the
        exchange. The circuit breaker and the outbound caps come first; a request they hold
        back fails fast as not sent.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        # The caller's raw headers (ASGI's, lowercase names): the allowed ones go on exactly
        # as they came.
        headers = [(k, v) for k, v in caller_headers if k in FORWARDED_HEADERS]
        headers += self._fixed_headers
        headers.append((b"x-request-id", request_id.encode()))
        if body is not None:
            headers.append((b"content-type", b"application/json"))
        reads = method in ("GET", "HEAD") or route in READ_ROUTES
        try:
            response = await self._guarded(method, path, headers, body, deadline, reads)
        except UpstreamError as exc:
            self._counter(route, exc.kind).inc()
            raise
        failed = _is_failure(response.status) or response.status == 429
        self._counter(route, "http_error" if failed else "ok").inc()
        timer = self._timers.get(route)
        if timer is None:
            timer = self._timers[route] = UPSTREAM_DURATION.labels(self.name, route)
        timer.observe(response.elapsed_s)
        return response

    def _counter(self, route: str, outcome: str) -> Counter:
        """The request counter's child for this route and outcome (``labels`` is slow)."""
        counter = self._counters.get((route, outcome))
        if counter is None:
            counter = UPSTREAM_REQUESTS.labels(self.name, route, outcome)
            self._counters[route, outcome] = counter
        return counter

    async def _guarded(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        deadline: float | None,
        reads: bool,
    ) -> UpstreamResponse:
        """``_send`` behind the circuit breaker and the outbound caps."""
        if not self.breaker.allow():
            detail = "circuit open after repeated failures; not called until it recovers"
            raise UpstreamError(self.name, "open", False, detail)
        try:
            slot = await self.caps.acquire(deadline)
        except Saturated:
            self.breaker.release_probe()
            detail = (
                f"saturated: more than {self.config.max_rps:g} requests/s or "
                f"{self.config.max_concurrency} in flight for as long as the request could wait"
            )
            raise UpstreamError(self.name, "saturated", False, detail) from None
        try:
            response = await self._send(method, path, headers, body, deadline, reads)
        finally:
            self.breaker.release_probe()
            await self.caps.release(slot)
        if _is_failure(response.status):
            self.breaker.failure()
        else:
            self.breaker.success()
        return response

    async def _send(
        self,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        deadline: float | None,
        reads: bool,
    ) -> UpstreamResponse:
        started = time.perf_counter()
        own_deadline = time.monotonic() + self.config.timeout_s
        deadline = own_deadline if deadline is None else min(deadline, own_deadline)
        progress = None if reads else _Progress()
        token = _PROGRESS.set(progress)
        # A pooled connection the upstream closed meanwhile fails at once; aiohttp sends
        # GETs again by itself, read POSTs are sent again here.
        retry = reads and method not in ("GET", "HEAD")
        try:
            while True:
                try:
                    left_s = deadline - time.monotonic()
                    if left_s <= 0:  # aiohttp reads a total timeout of 0 as none at all
                        raise TimeoutError
                    status, content, content_type = await self._exchange(
                        self._pooled if reads else self._fresh, method, path, headers, body, left_s
                    )
                    break
                except _Broken as exc:
                    self.breaker.failure()
                    raise UpstreamError(self.name, "broken", True, str(exc)) from None
                except _FAILURES as exc:
                    if retry and _stale_connection(exc):
                        retry = False
                        continue
                    kind, sent = _classify(exc)
                    if progress is not None:
                        sent = progress.connected
                    self.breaker.failure()
                    raise UpstreamError(self.name, kind, sent, _describe(exc, kind, sent)) from None
        finally:
            _PROGRESS.reset(token)
        return UpstreamResponse(
            upstream=self.name,
            status=status,
            content=content,
            content_type=content_type,
            elapsed_s=time.perf_counter() - started,
        )

    async def _exchange(
        self,
        transport: AiohttpTransport,
        method: str,
        path: str,
        headers: list[tuple[bytes, bytes]],
        body: bytes | None,
        timeout_s: float,
    ) -> tuple[int, bytes, str]:
        """Status, scrubbed body and content type of one HTTP exchange, within
        ``timeout_s``."""
        url = self._urls.get(path)
        if url is None:
            text = self._base_url + path if path.startswith("/") else f"{self._base_url}/{path}"
            url = httpx.URL(text)
            self._urls.set(path, url)
        # As a stream: httpx then adds no headers of its own (aiohttp sets Host and
        # Content-Length), which spares rebuilding the header list on every request.
        request = httpx.Request(
            method,
            url,
            headers=headers,
            stream=httpx.ByteStream(body or b""),
            extensions={"total_timeout": timeout_s},
        )
        response = await transport.handle_async_request(request)
        status = response.status_code
        if not 200 <= status <= 599:
            raise _Broken(f"answered an invalid HTTP status ({status})")
        content = self._decoded(response)
        content_type = _header(response, b"content-type") or "application/json"
        return status, self._scrub(content), self._scrub(content_type.encode()).decode()

    def _decoded(self, response: httpx.Response) -> bytes:
        """The body, decompressed. The transport read at most one byte past the size cap,
        and decompression stops there too, so an endless or inflating answer costs at most
        twice the cap in memory."""
        cap = self.config.max_response_bytes
        body = raw_body(response)
        if len(body) <= cap:
            body = _inflated(body, _header(response, b"content-encoding"), cap)
        if len(body) > cap:
            raise _Broken(f"answer larger than {cap} bytes")
        return body

    def _scrub(self, data: bytes) -> bytes:
        """Upstream bytes with every upstream key masked: one ``in`` per key, keys are few."""
        for secret in self._secrets:
            if secret in data:
                data = data.replace(secret, KEY_MASK)
        return data

    async def aclose(self) -> None:
        await asyncio.gather(self._pooled.aclose(), self._fresh.aclose(), self.caps.aclose())


def _inflated(body: bytes, encoding: str, room: int) -> bytes:
    """The body with its content-encoding undone, never more than ``room + 1`` bytes: one
    past the room tells the answer is too large."""
    coding = encoding.strip().lower()
    if coding in ("", "identity"):
        return body
    if coding not in ("gzip", "x-gzip", "deflate"):
        raise _Broken("answered in a content-encoding it was not offered")
    try:
        return zlib.decompressobj(zlib.MAX_WBITS | 32).decompress(body, room + 1)  # gzip or zlib
    except zlib.error:
        raise _Broken("answered a body that does not decompress") from None


@functools.cache
def _tls() -> ssl.SSLContext:
    """One TLS context for every upstream client: each new one costs over 100 ms."""
    return httpx.create_ssl_context(trust_env=False)


def _spellings(key: str) -> set[bytes]:
    """A key as an answer could quote it: as is, and escaped inside a JSON string."""
    quoted = orjson.dumps(key)[1:-1]
    return {key.encode(), quoted, quoted.replace(b"/", b"\\/")}


def _is_failure(status: int) -> bool:
    """An HTTP answer that counts against the upstream's circuit: it failed, or it refused
    the gateway's own key (a revoked key fails every request until someone acts)."""
    return status >= 500 or status in (401, 403)


def _cause(exc: BaseException) -> BaseException | None:
    """The aiohttp error behind an exception (httpx-aiohttp wraps some, not all)."""
    return exc.__cause__ if isinstance(exc, httpx.HTTPError) else exc


def _stale_connection(exc: BaseException) -> bool:
    """The connection broke before any answer, and not while connecting: a pooled
    connection the upstream had closed."""
    cause = _cause(exc)
    return isinstance(
        cause, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError
    ) and not isinstance(cause, aiohttp.ClientConnectorError)


def _classify(exc: BaseException) -> tuple[FailureKind, bool]:
    """What went wrong and whether the request may have reached the upstream.

    The aiohttp transport maps several aiohttp errors onto one httpx class (a server that
    hung up after reading the request becomes ``ConnectTimeout``), so judge by the cause.
    """
    if isinstance(exc, TimeoutError) and not isinstance(exc, aiohttp.ClientError):
        return "timeout", True
    cause = _cause(exc)
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


def _describe(exc: BaseException, kind: FailureKind, sent: bool) -> str:
    if kind == "connect":
        return "connection refused or unreachable"
    if kind == "timeout":
        return "timed out after the request was sent" if sent else "timed out connecting"
    if isinstance(_cause(exc), aiohttp.ClientResponseError):
        return "answered broken HTTP (status line, headers or framing)"
    return "connection broke before a complete answer"


def _header(response: httpx.Response, name: bytes) -> str:
    """A response header's value ("" when absent), read from the raw list: httpx's own lookup
    first decides the encoding of every header, a measurable share of a poll's cost."""
    for key, value in response.headers.raw:
        if key.lower() == name:
            return value.decode("latin-1")
    return ""


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
        caller_headers=info.headers,
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
