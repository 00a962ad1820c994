"""The gunicorn worker: ``uvicorn_worker.UvicornWorker`` with uvloop, httptools with the
header bounds of the config the master checked (``gateway.http11``), no uvicorn access log
(the gateway writes one line per request itself), and a shutdown that drains.

uvicorn's shutdown closes the listeners and at once closes every connection that has no
request in progress, including one accepted a moment ago whose request bytes have not been
read yet: that caller gets a closed connection and no answer. Under steady load a rolling
restart (SIGHUP) or a SIGTERM loses such requests. ``DrainingServer`` stops accepting first,
waits ``DRAIN_S`` so those requests arrive and start, then shuts down as uvicorn does:
in-flight requests finish, idle keep-alive connections close.

Closing a listening socket also resets every connection the kernel has completed but the
worker has not accepted yet (the loop accepts only between callbacks, so under load a busy
worker has a queue of them); those callers connected, sent a request and get a reset. The
last process to close the socket resets them, so each worker takes its queue over first:
it accepts what is waiting and serves it like any other connection, and closes the
listener in the same step, leaving no await for a new connection to queue in.
"""

from __future__ import annotations

import asyncio
import os
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
    """uvicorn's ``Server``, with a shutdown that loses no connection already made."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # The loop's servers close the sockets they were given; a duplicate keeps each
        # listening socket open until its queue is taken over.
        listeners = [socket.socket(fileno=os.dup(sock.fileno())) for sock in sockets or []]
        for server in self.servers:
            server.close()
        for sock in sockets or []:
            sock.close()
        waiting = [conn for listener in listeners for conn in _accept_waiting(listener)]
        loop = asyncio.get_running_loop()
        for conn in waiting:
            await loop.connect_accepted_socket(self._new_protocol, conn)
        await asyncio.sleep(DRAIN_S)
        await super().shutdown(sockets=None)

    def _new_protocol(self) -> asyncio.Protocol:
        # What uvicorn's ``startup`` gives its servers (a closure there).
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol


def _accept_waiting(listener: socket.socket) -> list[socket.socket]:
    """Accept every connection in ``listener``'s queue, then close it."""
    accepted: list[socket.socket] = []
    listener.setblocking(False)
    with listener:
        while True:
            try:
                conn, _ = listener.accept()
            except ConnectionAbortedError:  # a caller gone while it waited
                continue
            except OSError:  # the queue is empty (EAGAIN), or no descriptor is left
                return accepted
            conn.setblocking(False)
            accepted.append(conn)


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
