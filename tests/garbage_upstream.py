"""An upstream that breaks, lies or turns hostile on command: a real HTTP server on a raw
asyncio socket, so that it can send what no framework would (a bad status line, a body that
drips, a 50 MB task, a gzip bomb).

    python -m tests.garbage_upstream --port 8123 [--huge-mb 50] [--bomb-mb 100]

``POST /_garbage/mode`` with ``{"mode": NAME}`` picks how ``/mj/...`` requests are answered:

- ``off``: a sane, empty upstream: fetches not found, empty lists, submits accepted;
- ``html``, ``truncated``, ``wrong-id``, ``huge``, ``gzip-bomb``, ``drip``, ``bad-status``,
  ``huge-headers``, ``close``: one way of breaking each;
- ``mixed``: every broken way in turn, one per request;
- ``echo-key``: answers that quote the key the gateway presented (as some relays do).

``GET /_garbage/stats`` tells what it received (requests, submits, each submit's prompt,
the keys presented); ``POST /_garbage/reset`` forgets it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import itertools
import re
import subprocess
import sys
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import orjson

__all__ = ["BROKEN", "MODES", "GarbageProcess", "GarbageUpstream", "main"]

BROKEN = (
    "html",
    "truncated",
    "wrong-id",
    "huge",
    "gzip-bomb",
    "drip",
    "bad-status",
    "huge-headers",
    "close",
)
MODES = ("off", "mixed", "echo-key", *BROKEN)
_FETCH = re.compile(r"/task/([^/]+)/fetch$")
ROOT = Path(__file__).resolve().parent.parent
_HEAD_LIMIT = 1 << 20
DRIP_INTERVAL_S = 0.2


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def key(self) -> str:
        bearer = self.headers.get("authorization", "").removeprefix("Bearer ").strip()
        return self.headers.get("mj-api-secret") or bearer

    def json(self) -> Any:
        try:
            return orjson.loads(self.body)
        except orjson.JSONDecodeError:
            return None


@dataclass
class GarbageUpstream:
    """The server's state: the mode, and what it received."""

    huge_bytes: int
    bomb_bytes: int
    mode: str = "off"
    requests: int = 0
    submits: int = 0
    prompts: Counter[str] = field(default_factory=Counter)
    keys: set[str] = field(default_factory=set)
    _turn: itertools.cycle[str] = field(default_factory=lambda: itertools.cycle(BROKEN))
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _bomb: bytes | None = None

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError, ValueError):
            while True:
                request = await _read_request(reader)
                if request is None:
                    break
                if not await self.answer(request, writer):
                    break
        with contextlib.suppress(ConnectionError):
            writer.close()

    async def answer(self, request: Request, writer: asyncio.StreamWriter) -> bool:
        """Answer one request; False when the connection must end."""
        if request.path.startswith("/_garbage/"):
            status, body = self.control(request)
            await _send(writer, status, body)
            return True
        self.requests += 1
        if request.key:
            self.keys.add(request.key)
        submit = "/submit/" in request.path or "/insight-face/" in request.path
        if submit:
            self.submits += 1
            data = request.json()
            if isinstance(data, dict):
                self.prompts[str(data.get("prompt"))] += 1
        mode = next(self._turn) if self.mode == "mixed" else self.mode
        return await self.broken(mode, request, writer, submit)

    def control(self, request: Request) -> tuple[int, bytes]:
        if request.path == "/_garbage/stats":
            stats = {
                "mode": self.mode,
                "requests": self.requests,
                "submits": self.submits,
                "prompts": dict(self.prompts),
                "keys": sorted(self.keys),
            }
            return 200, orjson.dumps(stats)
        if request.path == "/_garbage/reset":
            self.requests = self.submits = 0
            self.prompts.clear()
            self.keys.clear()
            return 200, b"{}"
        if request.path == "/_garbage/mode":
            mode = (request.json() or {}).get("mode")
            if mode not in MODES:
                return 400, orjson.dumps({"error": f"mode must be one of {', '.join(MODES)}"})
            self.mode = mode
            return 200, orjson.dumps({"mode": mode})
        return 404, b"{}"

    async def broken(
        self, mode: str, request: Request, writer: asyncio.StreamWriter, submit: bool
    ) -> bool:
        asked = _FETCH.search(request.path)
        task_id = asked.group(1) if asked else f"{int(time.time() * 1000)}{next(self._ids):03d}"
        if mode == "off":
            status, body = self.sane(request, submit, task_id)
            await _send(writer, status, body)
        elif mode == "echo-key":
            await _send(writer, *_echo(request, submit, task_id))
        elif mode == "html":
            page = b"<html><body><h1>502 Bad Gateway</h1>down for maintenance</body></html>"
            await _send(writer, 200, page, "text/html")
        elif mode == "truncated":
            await _send(writer, 200, orjson.dumps(_task(task_id))[:25])
        elif mode == "wrong-id":
            other = _task(str(int(task_id) + 1) if task_id.isdigit() else f"{task_id}x")
            await _send(writer, 200, orjson.dumps(other if asked else [other]))
        elif mode == "huge":
            await self._huge(writer, task_id)
        elif mode == "gzip-bomb":
            await _send(writer, 200, self.bomb(), extra=[("Content-Encoding", "gzip")])
        elif mode == "drip":
            await _drip(writer, orjson.dumps(_task(task_id)))
        elif mode == "bad-status":
            writer.write(b"HTTP/1.1 42 Nope\r\nContent-Length: 2\r\n\r\n{}")
            await writer.drain()
        elif mode == "huge-headers":
            await _send(writer, 200, b"{}", extra=[("X-Padding", "p" * 200_000)])
        return mode not in ("close", "truncated", "bad-status", "drip", "huge")

    def sane(self, request: Request, submit: bool, task_id: str) -> tuple[int, bytes]:
        if submit:
            return 200, orjson.dumps(
                {"code": 1, "description": "Submit success", "result": task_id, "properties": {}}
            )
        if request.path.endswith(("/list-by-ids", "/list-by-condition", "/list", "/queue")):
            return 200, b"[]"
        if request.path.endswith("/query"):
            return 200, orjson.dumps({"content": [], "totalElements": 0, "totalPages": 0})
        return 404, b'{"code":3,"description":"task not found","result":null}'

    def bomb(self) -> bytes:
        if self._bomb is None:
            inflated = b'{"id":"1","prompt":"' + b"0" * self.bomb_bytes + b'"}'
            self._bomb = gzip.compress(inflated, compresslevel=9)
        return self._bomb

    async def _huge(self, writer: asyncio.StreamWriter, task_id: str) -> None:
        head = orjson.dumps(_task(task_id))[:-1] + b',"padding":"'
        filler = self.huge_bytes - len(head) - 2
        writer.write(_head(200, len(head) + filler + 2) + head)
        chunk = b"x" * (1 << 20)
        for _ in range(filler // len(chunk)):
            writer.write(chunk)
            await writer.drain()
        writer.write(b"x" * (filler % len(chunk)) + b'"}')
        await writer.drain()


def _task(task_id: str) -> dict[str, Any]:
    return {"id": task_id, "status": "SUCCESS", "action": "IMAGINE", "progress": "100%"}


def _echo(request: Request, submit: bool, task_id: str) -> tuple[int, bytes]:
    """Answers that quote the presented key, as relays do in error messages."""
    quoted = f"the api key {request.key} is not allowed on this channel"
    if submit:
        return 200, orjson.dumps({"code": 4, "description": quoted, "result": None})
    if _FETCH.search(request.path):
        return 200, orjson.dumps({**_task(task_id), "status": "FAILURE", "failReason": quoted})
    if request.path.endswith(("/list", "/queue", "/list-by-ids", "/list-by-condition")):
        return 200, orjson.dumps([{**_task(task_id), "failReason": quoted}])
    return 401, orjson.dumps({"error": {"message": quoted, "type": "auth_error"}})


def _head(status: int, length: int, kind: str = "application/json", extra: Any = ()) -> bytes:
    lines = [f"HTTP/1.1 {status} X", f"Content-Type: {kind}", f"Content-Length: {length}"]
    lines += [f"{name}: {value}" for name, value in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def _send(
    writer: asyncio.StreamWriter,
    status: int,
    body: bytes,
    kind: str = "application/json",
    extra: Any = (),
) -> None:
    writer.write(_head(status, len(body), kind, extra) + body)
    await writer.drain()


async def _drip(writer: asyncio.StreamWriter, body: bytes) -> None:
    writer.write(_head(200, len(body)))
    for byte in body:
        writer.write(bytes([byte]))
        await writer.drain()
        await asyncio.sleep(DRIP_INTERVAL_S)


async def _read_request(reader: asyncio.StreamReader) -> Request | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    if len(head) > _HEAD_LIMIT:
        raise ValueError("request head too large")
    request_line, *lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, target, _ = request_line.split(" ", 2)
    headers = {}
    for line in lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length") or 0)
    body = await reader.readexactly(length) if length else b""
    return Request(method, target.split("?", 1)[0], headers, body)


async def _run(port: int, upstream: GarbageUpstream) -> None:
    server = await asyncio.start_server(upstream.serve, "127.0.0.1", port, limit=_HEAD_LIMIT)
    print(f"garbage upstream listening on http://127.0.0.1:{port}", flush=True)
    async with server:
        await server.serve_forever()


@dataclass
class GarbageProcess:
    """The garbage upstream as a process of its own (it may send 50 MB: not in the test's
    process), with its control API."""

    name: str
    key: str
    port: int
    huge_mb: float = 50
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        args = [sys.executable, "-m", "tests.garbage_upstream", "--port", str(self.port)]
        return [*args, "--huge-mb", str(self.huge_mb)]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT
        )
        self.wait_ready()

    def wait_ready(self, timeout_s: float = 15.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                self.stats()
                return
            time.sleep(0.05)
        raise TimeoutError(f"garbage upstream {self.name} did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None

    def set_mode(self, mode: str) -> None:
        httpx.post(f"{self.url}/_garbage/mode", json={"mode": mode}).raise_for_status()

    def reset(self) -> None:
        httpx.post(f"{self.url}/_garbage/reset").raise_for_status()

    def stats(self) -> dict[str, Any]:
        response = httpx.get(f"{self.url}/_garbage/stats", timeout=5)
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def upstream_config(self, **overrides: Any) -> dict[str, Any]:
        return {
            "name": self.name,
            "base_url": self.url,
            "auth": "bearer",
            "key": self.key,
            "list_by_ids_path": "/mj/task/list-by-ids",
            "timeout_s": 2,
            "max_rps": 10_000,
            "max_concurrency": 256,
            **overrides,
        }


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tests.garbage_upstream")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--huge-mb", type=float, default=50, help="size of a 'huge' answer")
    parser.add_argument("--bomb-mb", type=float, default=100, help="a gzip bomb, inflated")
    args = parser.parse_args()
    upstream = GarbageUpstream(int(args.huge_mb * 1e6), int(args.bomb_mb * 1e6))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_run(args.port, upstream))


if __name__ == "__main__":
    main()
