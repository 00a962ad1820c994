"""A local image host standing in for the CDN, a trap that counts connections, and configs
for the image tests.

The image host (a real Starlette app under uvicorn, in a thread, on a loopback port) serves:

- ``/img/{name}``: a PNG (``host.add(name, data)``, else a small one made from the name);
- ``/exp/{name}?ex=HEX``: the same until the Unix time ``ex`` (Discord's signed links), then 404;
- ``/slow/{name}?delay=S&chunks=N``: the image in N pieces, S seconds apart;
- ``/redirect?to=URL``: a 302 to anywhere;
- ``/html.png`` (HTML, said to be HTML) and ``/fake.png`` (HTML said to be a PNG);
- ``/big.png`` (50 MB, with its length) and ``/big-chunked.png`` (50 MB, without);

and counts every request by path.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support import free_port, wait_until

BIG_BYTES = 50 * 1024 * 1024
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A valid PNG of random pixels: about ``width * height * 3`` bytes, incompressible."""
    rng = random.Random(seed)
    rows = b"".join(b"\x00" + rng.randbytes(width * 3) for _ in range(height))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(rows, 1))
    return PNG_SIGNATURE + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


class ImageHost:
    """The CDN stand-in, on ``127.0.0.1:port``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.images: dict[str, bytes] = {}
        self.hits: Counter[str] = Counter()
        app = Starlette(
            routes=[
                Route("/img/{name}", self._image),
                Route("/exp/{name}", self._expiring),
                Route("/slow/{name}", self._slow),
                Route("/redirect", self._redirect),
                Route("/html.png", self._html),
                Route("/fake.png", self._fake),
                Route("/big.png", self._big),
                Route("/big-chunked.png", self._big),
            ]
        )
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=lambda: asyncio.run(self.server.serve()), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.thread.start()
        wait_until(lambda: self.server.started, what="image host")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    def add(self, name: str, data: bytes) -> str:
        """Serve ``data`` as ``/img/{name}``; its URL."""
        self.images[name] = data
        return f"{self.url}/img/{name}"

    def image(self, name: str) -> bytes:
        if name not in self.images:
            self.images[name] = png(32, 32, seed=zlib.crc32(name.encode()))
        return self.images[name]

    def count(self, prefix: str = "/") -> int:
        """Requests received whose path starts with ``prefix``."""
        return sum(n for path, n in self.hits.items() if path.startswith(prefix))

    def _seen(self, request: Request) -> None:
        self.hits[request.url.path] += 1

    async def _image(self, request: Request) -> Response:
        self._seen(request)
        return Response(self.image(request.path_params["name"]), media_type="image/png")

    async def _expiring(self, request: Request) -> Response:
        self._seen(request)
        if time.time() >= int(request.query_params["ex"], 16):
            return Response("This content is no longer available.", 404)
        return Response(self.image(request.path_params["name"]), media_type="image/png")

    async def _slow(self, request: Request) -> Response:
        self._seen(request)
        data = self.image(request.path_params["name"])
        delay = float(request.query_params.get("delay", "1"))
        pieces = int(request.query_params.get("chunks", "4"))
        size = -(-len(data) // pieces)

        async def body() -> AsyncIterator[bytes]:
            for start in range(0, len(data), size):
                yield data[start : start + size]
                await asyncio.sleep(delay)

        headers = {"content-length": str(len(data))}
        return StreamingResponse(body(), media_type="image/png", headers=headers)

    async def _redirect(self, request: Request) -> Response:
        self._seen(request)
        return RedirectResponse(request.query_params["to"], status_code=302)

    async def _html(self, request: Request) -> Response:
        self._seen(request)
        return Response(
            "<html><body>Log in to see this image</body></html>", media_type="text/html"
        )

    async def _fake(self, request: Request) -> Response:
        self._seen(request)
        return Response("<html><script>alert(1)</script></html>", media_type="image/png")

    async def _big(self, request: Request) -> Response:
        self._seen(request)
        piece = b"\0" * (1024 * 1024)

        async def body() -> AsyncIterator[bytes]:
            yield PNG_SIGNATURE + piece[len(PNG_SIGNATURE) :]
            for _ in range(BIG_BYTES // len(piece) - 1):
                yield piece

        with_length = request.url.path == "/big.png"
        headers = {"content-length": str(BIG_BYTES)} if with_length else {}
        return StreamingResponse(body(), media_type="image/png", headers=headers)


@contextmanager
def image_host() -> Iterator[ImageHost]:
    host = ImageHost()
    host.start()
    try:
        yield host
    finally:
        host.stop()


class Trap:
    """A loopback listener that only counts the connections made to it: where a fetch must
    never arrive."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port: int = self.sock.getsockname()[1]
        self.connections = 0
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self.sock.close()


@contextmanager
def trap() -> Iterator[Trap]:
    listener = Trap()
    try:
        yield listener
    finally:
        listener.close()


def images_section(directory: str, **overrides: Any) -> dict[str, Any]:
    """An ``images:`` section allowing the image host (127.0.0.1), on disk in ``directory``."""
    return {
        "enabled": True,
        "allowed_hosts": ["127.0.0.1"],
        "dir": directory,
        "max_bytes": 8 * 1024 * 1024,
        "timeout_s": 5,
        **overrides,
    }


SECRET_KEY = "image-url-signing-secret-0123456789abcdef"
PUBLIC_URL = "https://mj.example.test/gw"


def server_section() -> dict[str, Any]:
    return {"secret_key": SECRET_KEY, "public_url": PUBLIC_URL}
