"""The server of ``mjgate serve`` and of each gunicorn worker: a shutdown that loses no
connection already made."""

from __future__ import annotations

import socket

import uvloop
from uvicorn import Config
from uvicorn.server import Server

from gateway.worker import DrainingServer

QUEUED = 20


async def hello(scope: dict[str, object], receive: object, send: object) -> None:
    assert scope["type"] == "http"
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"5")]}
    )  # type: ignore[operator]
    await send({"type": "http.response.body", "body": b"hello"})  # type: ignore[operator]


def answers_to_queued_connections(server_class: type[Server]) -> list[bytes | str]:
    """Start ``server_class`` on a listening socket, queue ``QUEUED`` connections that each
    sent a request while the loop could not accept them, shut down, and read what each got."""
    config = Config(hello, http="httptools", lifespan="off", log_level="warning")
    config.load()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(64)
    address = listener.getsockname()

    async def main() -> list[socket.socket]:
        server = server_class(config)
        server.lifespan = config.lifespan_class(config)  # as ``Server.serve`` sets it
        await server.startup(sockets=[listener])
        # No await from here to the shutdown: the loop cannot accept, as under load.
        callers = [socket.create_connection(address, timeout=5) for _ in range(QUEUED)]
        for caller in callers:
            caller.sendall(b"GET / HTTP/1.1\r\nhost: gateway\r\n\r\n")
        await server.shutdown(sockets=[listener])
        return callers

    answers: list[bytes | str] = []
    for caller in uvloop.run(main()):
        with caller:
            try:
                answers.append(caller.recv(4096))
            except OSError as exc:
                answers.append(type(exc).__name__)
    return answers


def test_a_connection_queued_at_shutdown_is_answered() -> None:
    answers = answers_to_queued_connections(DrainingServer)
    assert all(
        isinstance(answer, bytes)
        and answer.startswith(b"HTTP/1.1 200")
        and answer.endswith(b"hello")
        for answer in answers
    ), answers


def test_uvicorns_own_shutdown_resets_them() -> None:
    """What the draining server is for: the same connections under uvicorn's ``Server``."""
    answers = answers_to_queued_connections(Server)
    assert answers.count("ConnectionResetError") == QUEUED, answers
