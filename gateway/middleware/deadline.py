"""How long a request's body may take to arrive: ``server.body_timeout_s``, counted from the
moment its headers were read.

Without a bound, a body promised by ``Content-Length`` and never sent (or sent a byte at a
time) holds the request, its memory and its connection for as long as the caller likes.
"""

from __future__ import annotations

import asyncio

from starlette.types import Message, Receive

from gateway.errors import GatewayError

__all__ = ["body_deadline"]


def body_deadline(receive: Receive, timeout_s: float) -> Receive:
    """``receive`` raising ``GatewayError`` (408, closing the connection) once the body has
    not fully arrived ``timeout_s`` after now. Messages after the body pass untouched."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    complete = False

    async def bounded() -> Message:
        nonlocal complete
        if complete:
            return await receive()
        try:
            async with asyncio.timeout_at(deadline):
                message = await receive()
        except TimeoutError:
            description = f"the request body did not arrive within {timeout_s:g} s"
            raise GatewayError(408, description, {"connection": "close"}) from None
        complete = message["type"] != "http.request" or not message.get("more_body", False)
        return message

    return bounded
