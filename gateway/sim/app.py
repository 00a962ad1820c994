"""``create_sim_app``: the simulated upstream as one Starlette app."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount

from gateway.protocol import MODES
from gateway.sim.control import Control, json_response
from gateway.sim.routes import BadRequest
from gateway.sim.settings import SimSettings
from gateway.sim.upstream import Sim

__all__ = ["create_sim_app"]


async def _bad_request(request: Request, exc: Exception) -> Response:
    return json_response({"error": str(exc)}, 400)


def create_sim_app(settings: SimSettings) -> Starlette:
    """The simulated upstream as a Starlette app; its ``Sim`` is at ``app.state.sim``."""
    sim = Sim(settings)
    # new-api relays take the speed prefix in front of /mj (/mj-fast/mj/...) and in its place
    # (/mj-fast/...). A speed's /mj mount comes first: the bare speed mount would catch it.
    mounts: list[BaseRoute] = [
        Mount(f"{mode}/mj", routes=sim.mj_routes(f"{mode}/mj")) for mode in MODES
    ]
    mounts += [Mount(mode, routes=sim.mj_routes(mode)) for mode in MODES if mode]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        calling = asyncio.create_task(sim.tasks.hooks.run())
        try:
            yield
        finally:
            calling.cancel()
            await asyncio.gather(calling, return_exceptions=True)

    app = Starlette(
        routes=[*Control(sim).routes(), *mounts],
        exception_handlers={BadRequest: _bad_request, orjson.JSONDecodeError: _bad_request},
        lifespan=lifespan,
    )
    app.state.sim = sim
    return app
