"""Images in an S3-compatible bucket (``images.store: s3``): the copy every replica shares.

aiobotocore is the client: botocore's own request signing and error model, on aiohttp (which
the gateway already runs on), without a thread per call. The disk cache stays in front of the
bucket: an image is read from the bucket once per host, then served from disk.
"""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import aiohttp
import structlog
from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import BotoCoreError, ClientError

from gateway.config import S3Config

if TYPE_CHECKING:
    from types_aiobotocore_s3.client import S3Client

__all__ = ["S3Store"]

log = structlog.get_logger("mjgate.images")

_CHUNK = 256 * 1024
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})


class S3Store:
    """Reads and writes images as objects ``{prefix}{key}``. Failures are logged and count as
    misses: the image is then fetched from its host again."""

    def __init__(self, config: S3Config) -> None:
        self.config = config
        self._stack = AsyncExitStack()
        self._client: S3Client | None = None

    async def open(self) -> None:
        config = self.config
        # A custom endpoint (MinIO, moto, ...) is addressed by path, not by bucket subdomain.
        style = "path" if config.endpoint_url else "auto"
        client = get_session().create_client(
            "s3",
            region_name=config.region,
            endpoint_url=config.endpoint_url or None,
            aws_access_key_id=config.access_key.reveal() or None,
            aws_secret_access_key=config.secret_key.reveal() or None,
            config=AioConfig(
                connect_timeout=5,
                read_timeout=30,
                # No retries: a bucket that fails is a miss, and the image's host is next.
                retries={"total_max_attempts": 1},
                s3={"addressing_style": style},
            ),
        )
        self._client = await self._stack.enter_async_context(client)

    async def aclose(self) -> None:
        await self._stack.aclose()

    async def get(self, key: str, out: BinaryIO) -> str | None:
        """Write the object into ``out``; its content type, or None when there is none."""
        assert self._client is not None, "S3Store.open() first"
        try:
            answer = await self._client.get_object(Bucket=self.config.bucket, Key=self._key(key))
            async with answer["Body"] as body:
                while chunk := await body.read(_CHUNK):
                    await asyncio.to_thread(out.write, chunk)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") not in _MISSING:
                log.warning("s3_error", operation="get", error=str(exc))
            return None
        except (BotoCoreError, aiohttp.ClientError, OSError) as exc:
            log.warning("s3_error", operation="get", error=str(exc))
            return None
        return answer.get("ContentType")

    async def put(self, key: str, path: Path, content_type: str) -> bool:
        """Upload a stored image; False (logged) when the bucket could not take it."""
        assert self._client is not None, "S3Store.open() first"
        body = await asyncio.to_thread(path.read_bytes)
        try:
            await self._client.put_object(
                Bucket=self.config.bucket, Key=self._key(key), Body=body, ContentType=content_type
            )
        except (BotoCoreError, ClientError, aiohttp.ClientError, OSError) as exc:
            log.warning("s3_error", operation="put", error=str(exc))
            return False
        return True

    def _key(self, key: str) -> str:
        return f"{self.config.prefix}{key}"
