"""The image service: a task's image from disk, else S3, else its host, once however many ask.

``image`` answers an image request: the disk cache first (no I/O beyond a stat), then one
flight per image in this process that reads the bucket (``store: s3``) or fetches the host and
writes the disk cache (and the bucket). The service is also the task cache's ``ImageHook``:
it rewrites image links in task answers (``images.rewrite``) and, with ``images.rehost``,
keeps the image of every task first seen SUCCESS, so that the cached answer no longer has to
expire with the host's link.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import structlog
from starlette.types import Scope
from yarl import URL

from gateway.cache import TaskCache, image_expiry
from gateway.config import Config, ConfigError
from gateway.errors import GatewayError
from gateway.images.diskstore import EXTENSIONS, DiskStore, StoredImage
from gateway.images.fetch import ImageFetcher, ImageUnavailable, caps_key
from gateway.images.hosts import HostPolicy, Refused
from gateway.images.links import LinkRewriter, original_links
from gateway.images.s3store import S3Store
from gateway.images.signing import UrlSigner, signed_expiry, signed_url_caller
from gateway.lru import LRU
from gateway.metrics import IMAGES_REHOSTED
from gateway.upstreams import UpstreamPool

__all__ = ["ImageService", "Served", "image_key"]

log = structlog.get_logger("mjgate.images")

Spawn = Callable[[Coroutine[Any, Any, None]], None]
# A failed rehost is not tried again for this long: the host's link has likely expired.
_RETRY_REHOST_S = 60.0
# A rehost that fails drops the task's cached answer; the answer may be written just after
# (the rehost starts before the cache write ends), so it is dropped once more this much later.
_INVALIDATE_AGAIN_S = 1.0


@dataclass(frozen=True, slots=True)
class Served:
    """An image to answer with, and where it was found: ``disk``, ``s3`` or ``cdn``."""

    image: StoredImage
    source: str


def image_key(task_id: str, url: str) -> str:
    """The name an image is kept under: its task and its link without the query (a CDN
    signs the same image's link anew, with another query, for every answer)."""
    parts = urlsplit(url)
    identity = f"{task_id}\n{parts.scheme}://{parts.netloc.lower()}{parts.path}"
    return hashlib.sha256(identity.encode()).hexdigest()[:40]


class ImageService:
    """Images of tasks: served, fetched safely, kept on disk (and S3), and rehosted."""

    def __init__(self, config: Config, pool: UpstreamPool, cache: TaskCache, spawn: Spawn) -> None:
        images = config.images
        self.config = images
        secret = config.server.secret_key.reveal()
        self.signer = (
            UrlSigner(secret, images.url_ttl_s, config.server.public_url) if secret else None
        )
        self.rewriter = LinkRewriter(self.signer) if images.rewrite and self.signer else None
        self.signed_caller = signed_url_caller(images.signed_rate_limit)
        bases = [URL(upstream.config.base_url) for upstream in pool.all]
        self.policy = HostPolicy(images.allowed_hosts, [base.host for base in bases if base.host])
        caps = {
            caps_key(base): upstream.caps for base, upstream in zip(bases, pool.all, strict=True)
        }
        self.fetcher = ImageFetcher(images, self.policy, caps)
        self.disk = DiskStore(Path(images.dir), images.max_disk_bytes)
        self.s3 = S3Store(images.s3) if images.store == "s3" else None
        self._cache = cache
        self._spawn = spawn
        self._flights: dict[str, asyncio.Task[Served]] = {}
        self._keeping: set[str] = set()
        self._failed: LRU[str, float] = LRU(10_000)  # rehosts that failed: key -> when

    async def open(self) -> None:
        try:
            await asyncio.to_thread(self.disk.open)
        except OSError as exc:
            raise ConfigError(
                [f"images.dir: cannot use {self.config.dir}: {exc.strerror}"]
            ) from None
        await self.fetcher.open()
        if self.s3 is not None:
            await self.s3.open()

    async def aclose(self) -> None:
        flights = list(self._flights.values())
        for flight in flights:
            flight.cancel()
        await asyncio.gather(*flights, return_exceptions=True)
        await self.fetcher.aclose()
        if self.s3 is not None:
            await self.s3.aclose()

    # --- serving ---------------------------------------------------------------------------

    def presigned(self, scope: Scope) -> bool:
        """A request that presents a signed image URL instead of a key."""
        return (
            self.signer is not None
            and scope["path"].startswith("/mj/image/")
            and b"sig=" in scope["query_string"]
        )

    def check_signature(self, task_id: str, n: int | None, query: Mapping[str, str]) -> int:
        """The signed URL's expiry; GatewayError 403 when it is not a valid, current one."""
        if self.signer is None:
            raise GatewayError(403, "signed image URLs are off: server.secret_key is not set")
        exp, sig = query.get("exp", ""), query.get("sig", "")
        problem = self.signer.check(task_id, n, exp, sig, time.time())
        if problem is not None:
            raise GatewayError(403, problem)
        return int(exp)

    async def image(self, task_id: str, url: str) -> Served:
        """The image at ``url`` of task ``task_id``; concurrent misses share one flight."""
        key = image_key(task_id, url)
        stored = self.disk.get(key)
        if stored is not None:
            return Served(stored, "disk")
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.create_task(self._obtain(key, url))
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._landed(key, done))
        return await asyncio.shield(flight)

    def _landed(self, key: str, flight: asyncio.Task[Served]) -> None:
        self._flights.pop(key, None)
        if not flight.cancelled():
            flight.exception()  # retrieved: a flight nobody waits for any more is no error

    async def _obtain(self, key: str, url: str) -> Served:
        if self.s3 is not None:
            s3 = self.s3
            stored = await self._download(key, lambda out: s3.get(key, out))
            if stored is not None:
                return Served(stored, "s3")
        stored = await self._download(key, lambda out: self._fetch_type(url, out))
        assert stored is not None
        if self.s3 is not None:
            await self.s3.put(key, stored.path, stored.content_type)
        return Served(stored, "cdn")

    async def _fetch_type(self, url: str, out: BinaryIO) -> str:
        content_type, _ = await self.fetcher.fetch(url, out)
        return content_type

    async def _download(
        self, key: str, write: Callable[[BinaryIO], Awaitable[str | None]]
    ) -> StoredImage | None:
        """``write`` into a temporary file, then store it under ``key``; None when ``write``
        had nothing (an image's type) to give."""
        temp, out = await asyncio.to_thread(self.disk.temp)
        try:
            content_type = await write(out)
            if content_type not in EXTENSIONS:
                self.disk.discard(temp, out)
                return None
            return await asyncio.to_thread(self.disk.commit, temp, out, key, content_type)
        except BaseException:
            self.disk.discard(temp, out)
            raise

    # --- the task cache's hook (gateway.cache.ImageHook) -----------------------------------

    def rewrite(self, task: dict[str, Any]) -> bool:
        return self.rewriter is not None and self.rewriter.rewrite(task, time.time())

    def admit(self, upstream: str, task: dict[str, Any]) -> int | None:
        links = original_links(task)
        kept: set[str] = set()
        task_id = task.get("id")
        if self.config.rehost and task.get("status") == "SUCCESS" and isinstance(task_id, str):
            for _, link in links:
                if self._keep(upstream, task_id, link):
                    kept.add(link)
        expiries = [
            expiry
            for n, link in links
            if n is None and link not in kept and (expiry := image_expiry({"imageUrl": link}))
        ]
        url = task.get("imageUrl")
        if self.rewriter is not None and isinstance(url, str):
            signed = signed_expiry(url)
            expiries += [signed] if signed is not None else []
        return min(expiries, default=None)

    def _keep(self, upstream: str, task_id: str, url: str) -> bool:
        """Start keeping the image at ``url`` (unless under way); False when it cannot be."""
        try:
            self.policy.check(URL(url))
        except (Refused, ValueError):
            return False
        key = image_key(task_id, url)
        failed = self._failed.get(key)
        if failed is not None and time.monotonic() - failed < _RETRY_REHOST_S:
            return False
        if key not in self._keeping:
            self._keeping.add(key)
            self._spawn(self._rehost(upstream, task_id, url, key))
        return True

    async def _rehost(self, upstream: str, task_id: str, url: str, key: str) -> None:
        try:
            served = await self.image(task_id, url)
            if served.source == "cdn":
                IMAGES_REHOSTED.inc()
        except (ImageUnavailable, OSError) as exc:
            reason = exc.reason if isinstance(exc, ImageUnavailable) else "disk"
            log.warning("rehost_failed", task_id=task_id, upstream=upstream, reason=reason)
            self._failed.set(key, time.monotonic())
            # The task's answer was cached past its image link on the promise of this copy.
            await self._cache.invalidate([task_id], [upstream])
            await asyncio.sleep(_INVALIDATE_AGAIN_S)
            await self._cache.invalidate([task_id], [upstream])
        finally:
            self._keeping.discard(key)
