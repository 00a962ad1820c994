"""The gunicorn worker: ``uvicorn_worker.UvicornWorker`` with uvloop, httptools with the
header bounds of the config the master checked (``gateway.http11``), no uvicorn access log
(the gateway writes one line per request itself), and a shutdown that drains.

uvicorn's shutdown closes the listeners and at once closes every connection that has no
request in progress, including one accepted a moment ago whose request bytes have not been
read yet: that caller gets a closed connection and no answer. Under steady load a rolling
restart (SIGHUP) or a SIGTERM loses such requests. ``DrainingServer`` stops accepting first,
waits ``DRAIN_S`` so those requests arrive and start, then shuts down as uvicorn does:
in-flight requests finish, idle keep-alive connections close.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any, ClassVar

from gunicorn.arbiter import Arbiter  # type: ignore[import-untyped]
from uvicorn.server import Server
from uvicorn_worker import UvicornWorker

from gateway.http11 import bounded_http
from gateway.master import running_config

__all__ = ["DRAIN_S", "DrainingServer", "MjgateWorker"]

DRAIN_S = 0.5


class DrainingServer(Server):
    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        await asyncio.sleep(DRAIN_S)
        await super().shutdown(sockets=None)


class MjgateWorker(UvicornWorker):  # type: ignore[misc]  # uvicorn-worker ships no types
    CONFIG_KWARGS: ClassVar[dict[str, Any]] = {
        "loop": "uvloop",
        "http": "httptools",
        "access_log": False,
        "proxy_headers": False,  # as gateway.server: nothing reads the caller's address
    }

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.config.http = bounded_http(running_config().server)

    async def _serve(self) -> None:
        # UvicornWorker._serve with DrainingServer in place of uvicorn's Server.
        self.config.app = self.wsgi
        server = DrainingServer(config=self.config)
        self._install_sigquit_handler()
        await server.serve(sockets=self.sockets)
        if not server.started:
            sys.exit(Arbiter.WORKER_BOOT_ERROR)
