"""HTTP/1.1 on a raw socket, for requests no client library would send: duplicate or broken
headers, lying ``Content-Length``, smuggling shapes, slow senders.

``exchange`` sends bytes (in parts, with pauses if asked) and reads one answer, or notes
that the server closed the connection without one.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

__all__ = ["Reply", "exchange", "request_bytes"]


@dataclass
class Reply:
    """What came back: ``status`` None when the connection closed (or stayed silent until
    the timeout, then ``timed_out``) without an answer."""

    status: int | None
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    closed: bool = False  # the server closed the connection after (or instead of) answering
    timed_out: bool = False
    seconds: float = 0.0

    def header(self, name: str) -> str | None:
        values = [v for k, v in self.headers if k == name.lower()]
        return values[0] if values else None

    def json(self) -> Any:
        return orjson.loads(self.body)


def request_bytes(
    method: str,
    target: str,
    headers: Sequence[tuple[str, str]] = (),
    body: bytes = b"",
    *,
    content_length: bool = True,
) -> bytes:
    """One request as bytes; ``Host`` first, then ``headers`` exactly as given, then a
    ``Content-Length`` for ``body`` unless told not to add one."""
    lines = [f"{method} {target} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers]
    if content_length and body:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def exchange(
    port: int,
    parts: bytes | Sequence[bytes],
    *,
    pause_s: float = 0.0,
    timeout_s: float = 5.0,
) -> Reply:
    """Send ``parts`` (``pause_s`` between them) and read one answer within ``timeout_s``."""
    chunks = [parts] if isinstance(parts, bytes) else list(parts)
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        for index, chunk in enumerate(chunks):
            if index and pause_s:
                time.sleep(pause_s)
            try:
                sock.sendall(chunk)
            except OSError:
                break  # the server gave up on us: read what it said, if anything
        reply = _read_reply(sock, started + timeout_s)
    reply.seconds = time.monotonic() - started
    return reply


def _read_reply(sock: socket.socket, deadline: float) -> Reply:
    buffer = b""
    while b"\r\n\r\n" not in buffer:
        data = _recv(sock, deadline)
        if data is None:
            return Reply(None, timed_out=True)
        if not data:
            return Reply(None, closed=True)
        buffer += data
    head, _, rest = buffer.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    status = int(status_line.split(" ", 2)[1])
    headers = [
        (name.strip().lower(), value.strip())
        for name, _, value in (line.partition(":") for line in header_lines)
    ]
    length = next((int(v) for k, v in headers if k == "content-length"), None)
    body, closed = rest, False
    while length is None or len(body) < length:
        data = _recv(sock, deadline)
        if not data:
            closed = data is not None
            break
        body += data
    if not closed:
        closed = _recv(sock, time.monotonic() + 0.05) == b""
    return Reply(status, headers, body[:length] if length is not None else body, closed)


def _recv(sock: socket.socket, deadline: float) -> bytes | None:
    """Bytes, b"" when the peer closed (or reset) the connection, None at the deadline."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return None
    sock.settimeout(remaining)
    try:
        return sock.recv(65536)
    except TimeoutError:
        return None
    except ConnectionError:
        return b""
