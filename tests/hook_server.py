"""A callback receiver for tests: a real HTTP server on a loopback port that records every
request and can be told to fail."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import orjson

from tests.support import free_port, wait_until


@dataclass(frozen=True)
class Received:
    path: str
    headers: dict[str, str]
    body: bytes

    def task(self) -> dict[str, Any]:
        task: dict[str, Any] = orjson.loads(self.body)
        return task


class HookServer:
    """Records requests; answers 200, or 503 to the first ``fail_first`` attempts of each
    message (by ``webhook-id``), or to everything while ``down``."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[Received] = []
        self.fail_first = 0
        self.down = False
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length)
                headers = {k.lower(): v for k, v in self.headers.items()}
                with server.lock:
                    message = headers.get("webhook-id")
                    earlier = sum(r.headers.get("webhook-id") == message for r in server.received)
                    server.received.append(Received(self.path, headers, body))
                    failing = server.down or earlier < server.fail_first
                self.send_response(503 if failing else 200)
                self.send_header("content-length", "0")
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def url(self, path: str = "/hook") -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def tasks(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r.task() for r in self.received]

    def wait_for_status(self, task_id: str, status: str, timeout_s: float = 20) -> None:
        def arrived() -> bool:
            return any(t["id"] == task_id and t["status"] == status for t in self.tasks())

        wait_until(arrived, timeout_s, f"a callback with {task_id} {status}")


@contextmanager
def hook_server() -> Iterator[HookServer]:
    server = HookServer()
    server.thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
