"""The upstream transport: httpx's transport interface over one aiohttp session.

httpx-aiohttp's transport does this job for any caller; on a poll, its generality was about
a fifth of the gateway's CPU: it prints each URL to text for aiohttp to parse again, decodes
every header twice, builds a timeout object per request and wraps the body in two streams.
This one serves ``gateway.upstreams`` alone, whose requests carry their body in memory and no
per-request timeout (the caller bounds the whole exchange): each URL is parsed for aiohttp
once, the timeouts are built once, and aiohttp's errors reach the caller as they are
(``gateway.upstreams`` classifies them by their aiohttp type).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable

import aiohttp
import httpx
import yarl

from gateway.lru import LRU

__all__ = ["AiohttpTransport"]

_PARSED_URLS = 4096


class AiohttpTransport(httpx.AsyncBaseTransport):
    """Sends httpx requests with an aiohttp session made on first use (inside the event
    loop, as aiohttp wants); answers stream their body raw (no decompression)."""

    def __init__(self, session: Callable[[], aiohttp.ClientSession], timeout: httpx.Timeout):
        self._new_session = session
        self._session: aiohttp.ClientSession | None = None
        self._timeout = aiohttp.ClientTimeout(
            sock_connect=timeout.connect, sock_read=timeout.read, connect=timeout.pool
        )
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
            timeout=self._timeout,
        ).__aenter__()
        return httpx.Response(
            answer.status, headers=answer.raw_headers, stream=_Body(answer), request=request
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


class _Body(httpx.AsyncByteStream):
    def __init__(self, answer: aiohttp.ClientResponse) -> None:
        self._answer = answer

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._answer.content.iter_any():
            yield chunk

    async def aclose(self) -> None:
        # As aiohttp's own context manager ends an answer: a fully read connection goes
        # back to the pool, one read in part is closed.
        self._answer.release()
        await self._answer.wait_for_close()
