"""The gunicorn worker: ``uvicorn_worker.UvicornWorker`` with uvloop, httptools, and no
uvicorn access log (the gateway writes one line per request itself)."""

from __future__ import annotations

from typing import Any, ClassVar

from uvicorn_worker import UvicornWorker

__all__ = ["MjgateWorker"]


class MjgateWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no types
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
    }
