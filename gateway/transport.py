"""The upstream transport: httpx's transport interface over one aiohttp session.

httpx-aiohttp's transport does this job for any caller; on a poll, its generality was about
a fifth of the gateway's CPU: it prints each URL to text for aiohttp to parse again, decodes
every header twice, builds a timeout object per request and wraps the body in two streams.
This one serves ``gateway.upstreams`` alone, whose requests carry their body in memory and
bound the whole exchange with a deadline: each URL is parsed for aiohttp once, the body is
read here in one call (three nested async generators, httpx's, the transport's and
aiohttp's, were a tenth of a poll's CPU), and aiohttp's errors reach the caller as they are
(``gateway.upstreams`` classifies them by their aiohttp type).

A request's ``total_timeout`` extension (seconds, > 0) becomes aiohttp's total timeout, which
bounds everything from the wait for a connection to the last byte of the body. It replaces an
``asyncio.timeout`` around the exchange: aiohttp arms a timer of its own for the request
anyway, and the second one cost a poll about 3% of its CPU.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import aiohttp
import httpx
import yarl

from gateway.lru import LRU

__all__ = ["AiohttpTransport", "raw_body"]

_PARSED_URLS = 4096


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with an aiohttp session made on first use (inside the event
    loop, as aiohttp wants). An answer comes back read, its body raw (not decompressed) and
    cut one byte past ``max_body_bytes``, so the caller can tell it was too large."""

    def __init__(
        self,
        session: Callable[[], aiohttp.ClientSession],
        timeout: httpx.Timeout,
        max_body_bytes: int,
    ) -> None:
        self._new_session = session
        self._max_body_bytes = max_body_bytes
        self._session: aiohttp.ClientSession | None = None
        self._connect_s, self._read_s, self._pool_s = timeout.connect, timeout.read, timeout.pool
        # By the URL's text: an httpx request copies the URL object it is given, and
        # printing it is far cheaper than parsing it again.
        self._urls: LRU[str, yarl.URL] = LRU(_PARSED_URLS)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if self._session is None:
            self._session = self._new_session()
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in request.headers.raw]
        answer = await self._session.request(
            request.method,
            self._url(request.url),
            headers=headers,
            data=request.read() or None,
            allow_redirects=False,
            auto_decompress=False,
            compress=False,
            timeout=self._timeout(request.extensions.get("total_timeout")),
        )
        try:
            body = await self._read(answer)
        finally:
            # As aiohttp's own context manager ends an answer: a connection whose answer
            # was read whole goes back to the pool, any other is closed.
            answer.release()
            await answer.wait_for_close()
        return httpx.Response(
            answer.status,
            headers=answer.raw_headers,
            stream=httpx.ByteStream(body),
            request=request,
        )

    async def _read(self, answer: aiohttp.ClientResponse) -> bytes:
        """The raw body, or its first ``max_body_bytes + 1`` bytes when it is longer (the
        connection is then closed: it still holds the rest)."""
        chunks: list[bytes] = []
        left = self._max_body_bytes + 1
        while left > 0:
            chunk = await answer.content.read(left)
            if not chunk:
                return b"".join(chunks)
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)

    def _timeout(self, total_s: float | None) -> aiohttp.ClientTimeout:
        # No rounding up to a whole second (aiohttp's ceil_threshold): a deadline is exact.
        return aiohttp.ClientTimeout(
            total=total_s,
            connect=self._pool_s,
            sock_connect=self._connect_s,
            sock_read=self._read_s,
            ceil_threshold=math.inf,
        )

    def _url(self, url: httpx.URL) -> yarl.URL:
        text = str(url)
        parsed = self._urls.get(text)
        if parsed is None:
            parsed = yarl.URL(text, encoded=True)
            self._urls.set(text, parsed)
        return parsed

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()


def raw_body(response: httpx.Response) -> bytes:
    """The body of an answer from ``AiohttpTransport``, as it came (httpx's own readers
    would decompress it, without a cap, and through async generators)."""
    stream = response.stream
    if not isinstance(stream, httpx.ByteStream):
        raise TypeError(f"not an answer of AiohttpTransport: {stream!r}")
    return b"".join(stream)
