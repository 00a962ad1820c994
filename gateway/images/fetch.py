"""One fetch of an image from its host: allowed hosts only, redirects checked again, a size
cap, image bytes only, one deadline for all of it, and an upstream's outbound caps when the
host is that upstream's."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import BinaryIO

import aiohttp
from yarl import URL

from gateway.config import ImagesConfig
from gateway.errors import GatewayError, Saturated
from gateway.images.hosts import GuardedResolver, HostPolicy, Refused, refusal_in
from gateway.metrics import IMAGE_FETCH_DURATION, IMAGE_FETCHES
from gateway.outbound import OutboundCaps

__all__ = ["ImageFetcher", "ImageUnavailable", "caps_key", "sniff"]

MAX_REDIRECTS = 5
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# What an expired signed CDN link answers.
_GONE = frozenset({401, 403, 404, 410})
# Content types a host may claim for the bytes of an image; the bytes themselves decide.
_OPAQUE_TYPES = ("image/", "application/octet-stream", "binary/octet-stream")
_CHUNK = 256 * 1024
_SNIFF_BYTES = 16


class ImageUnavailable(GatewayError):
    """The image could not be had from its host; ``reason`` is the metric's outcome label."""

    def __init__(self, status: int, description: str, reason: str) -> None:
        super().__init__(status, description)
        self.reason = reason


def sniff(head: bytes) -> str | None:
    """The image type of a file from its first bytes; None when it is not an image served
    as one (SVG, which can carry script, is deliberately not one)."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if head.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp"
    if head[4:12] in (b"ftypavif", b"ftypavis"):
        return "image/avif"
    return None


def caps_key(url: URL) -> str:
    """``host:port``: how an image URL is matched with an upstream's base URL."""
    return f"{url.host}:{url.port}"


class ImageFetcher:
    """Fetches images into files, within the host policy. ``open`` before use."""

    def __init__(
        self, config: ImagesConfig, policy: HostPolicy, caps: Mapping[str, OutboundCaps]
    ) -> None:
        self.config = config
        self.policy = policy
        self._caps = caps
        self._session: aiohttp.ClientSession | None = None

    async def open(self) -> None:
        connector = aiohttp.TCPConnector(resolver=GuardedResolver(self.policy), limit=64)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),
            trust_env=False,
            headers={"Accept": "image/*"},
        )

    async def aclose(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def fetch(self, url: str, out: BinaryIO) -> tuple[str, int]:
        """Write the image at ``url`` into ``out``; its content type and size. Raises
        ImageUnavailable, having counted the outcome."""
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.config.timeout_s):
                result = await self._follow(URL(url), out)
        except ImageUnavailable as exc:
            IMAGE_FETCHES.labels(exc.reason).inc()
            raise
        except (Refused, aiohttp.ClientError, TimeoutError) as exc:
            unavailable = _unavailable(exc)
            IMAGE_FETCHES.labels(unavailable.reason).inc()
            raise unavailable from None
        IMAGE_FETCHES.labels("ok").inc()
        IMAGE_FETCH_DURATION.observe(time.perf_counter() - started)
        return result

    async def _follow(self, url: URL, out: BinaryIO) -> tuple[str, int]:
        assert self._session is not None, "ImageFetcher.open() first"
        for _ in range(MAX_REDIRECTS + 1):
            self.policy.check(url)
            async with (
                self._capped(url),
                self._session.get(url, allow_redirects=False) as response,
            ):
                location = response.headers.get("Location")
                if response.status in _REDIRECTS and location:
                    url = url.join(URL(location))
                    continue
                _check_answer(response, self.config.max_bytes)
                return await self._read(response, out)
        raise ImageUnavailable(502, f"more than {MAX_REDIRECTS} redirects", "redirects")

    @asynccontextmanager
    async def _capped(self, url: URL) -> AsyncIterator[None]:
        """The upstream's outbound caps, when the image is on an upstream's own host."""
        caps = self._caps.get(caps_key(url))
        if caps is None:
            yield
            return
        try:
            holder = await caps.acquire()
        except Saturated:
            full = "the upstream's outbound caps are full"
            raise ImageUnavailable(503, full, "saturated") from None
        try:
            yield
        finally:
            await caps.release(holder)

    async def _read(self, response: aiohttp.ClientResponse, out: BinaryIO) -> tuple[str, int]:
        limit = self.config.max_bytes
        head = b""
        content_type: str | None = None
        size = 0
        async for chunk in response.content.iter_chunked(_CHUNK):
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            if content_type is None:
                head += chunk[:_SNIFF_BYTES]
                if len(head) < _SNIFF_BYTES:
                    await asyncio.to_thread(out.write, chunk)
                    continue
                content_type = _sniffed(head)
            await asyncio.to_thread(out.write, chunk)
        return content_type or _sniffed(head), size


def _check_answer(response: aiohttp.ClientResponse, limit: int) -> None:
    status = response.status
    if status in _GONE:
        detail = f"the image is gone from its host (HTTP {status}); its link may have expired"
        raise ImageUnavailable(404, detail, "gone")
    if status != 200:
        raise ImageUnavailable(502, f"the image host answered HTTP {status}", "http_error")
    claimed = response.headers.get("Content-Type", "").lower()
    if claimed and not claimed.startswith(_OPAQUE_TYPES):
        what = claimed.split(";", 1)[0]
        raise ImageUnavailable(502, f"the image host answered {what}, not an image", "not_image")
    if response.content_length is not None and response.content_length > limit:
        raise _too_large(limit)


def _sniffed(head: bytes) -> str:
    content_type = sniff(head)
    if content_type is None:
        detail = "the image host answered bytes that are not a PNG, JPEG, GIF, WebP or AVIF"
        raise ImageUnavailable(502, detail, "not_image")
    return content_type


def _too_large(limit: int) -> ImageUnavailable:
    return ImageUnavailable(
        502, f"the image is larger than images.max_bytes ({limit})", "too_large"
    )


def _unavailable(exc: Refused | aiohttp.ClientError | TimeoutError) -> ImageUnavailable:
    """The caller's error for a fetch that failed."""
    refusal = exc if isinstance(exc, Refused) else refusal_in(exc)
    if refusal is not None:
        return ImageUnavailable(502, f"refused to fetch the image: {refusal}", "refused")
    if isinstance(exc, aiohttp.InvalidURL):
        return ImageUnavailable(502, "refused to fetch the image: invalid URL", "refused")
    if isinstance(exc, TimeoutError):
        return ImageUnavailable(504, "the image host did not answer in time", "timeout")
    if isinstance(exc, aiohttp.ClientConnectorError):
        return ImageUnavailable(502, "could not connect to the image host", "connect")
    return ImageUnavailable(502, "the image host broke the connection", "broken")
