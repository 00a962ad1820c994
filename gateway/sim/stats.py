"""What the simulated upstream saw on its ``/mj`` routes, for ``/_sim/stats``."""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from starlette.types import Scope

__all__ = ["HISTORY", "Stats"]

HISTORY = 200  # recent requests kept for /_sim/stats headers and paths


class Stats:
    """What the sim saw on its ``/mj`` routes, for ``/_sim/stats``."""

    def __init__(self) -> None:
        self.inflight = 0
        self.reset()

    def reset(self) -> None:
        """Forget everything except the requests still in flight."""
        self.requests: dict[str, int] = {}
        self.prefixes: dict[str, int] = {}
        self.total = 0
        self.submits = 0
        self.max_inflight = self.inflight
        self.per_second: dict[int, int] = {}
        self.headers: deque[dict[str, str]] = deque(maxlen=HISTORY)
        self.paths: deque[str] = deque(maxlen=HISTORY)

    def arrive(self, key: str, prefix: str, scope: Scope) -> None:
        self.requests[key] = self.requests.get(key, 0) + 1
        self.prefixes[prefix] = self.prefixes.get(prefix, 0) + 1
        self.total += 1
        second = int(time.time())
        if second not in self.per_second:
            for old in [s for s in self.per_second if s <= second - 120]:
                del self.per_second[old]
        self.per_second[second] = self.per_second.get(second, 0) + 1
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name, value = raw_name.decode("latin-1").lower(), raw_value.decode("latin-1")
            headers[name] = f"{headers[name]}, {value}" if name in headers else value
        self.headers.append(headers)
        path = scope.get("raw_path") or scope["path"].encode()
        query = scope.get("query_string") or b""
        self.paths.append((path + b"?" + query if query else path).decode("latin-1"))
        self.inflight += 1
        self.max_inflight = max(self.max_inflight, self.inflight)

    def snapshot(self) -> dict[str, Any]:
        cutoff = int(time.time()) - 120
        return {
            "requests": dict(self.requests),
            "prefixes": dict(self.prefixes),
            "total": self.total,
            "submits": self.submits,
            "inflight": self.inflight,
            "max_inflight": self.max_inflight,
            "per_second": {str(s): n for s, n in sorted(self.per_second.items()) if s > cutoff},
            "headers": list(self.headers),
            "paths": list(self.paths),
        }
