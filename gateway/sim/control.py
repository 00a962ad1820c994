"""``/_sim/...``: the unauthenticated control API of the simulated upstream, for tests and
benchmarks (health, stats, reset, faults, seeding and reading tasks)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.sim.routes import BadRequest
from gateway.sim.settings import RUNTIME_FIELDS
from gateway.sim.tasks import FAIL_REASONS, Art, Json, seeded_task
from gateway.sim.upstream import Sim

__all__ = ["Control", "json_response"]


def json_response(value: Any, status: int = 200) -> Response:
    """``value`` as a JSON response."""
    return Response(orjson.dumps(value), status_code=status, media_type="application/json")


class Control:
    """The ``/_sim`` routes over one ``Sim``."""

    def __init__(self, sim: Sim) -> None:
        self.sim = sim

    async def _body(self, request: Request) -> Json:
        raw = await request.body()
        value = orjson.loads(raw) if raw.strip() else {}
        if not isinstance(value, dict):
            raise BadRequest("body must be a JSON object")
        return value

    async def health(self, request: Request) -> Response:
        return json_response({"ok": True, "flavor": self.sim.flavor, "auth": self.sim.auth})

    async def stats(self, request: Request) -> Response:
        hooks = self.sim.tasks.hooks
        return json_response(
            {
                **self.sim.stats.snapshot(),
                "notify_hooks": list(hooks.received),
                "hooks_sent": hooks.sent,
                "hooks_failed": hooks.failed,
            }
        )

    async def reset(self, request: Request) -> Response:
        body = await self._body(request)
        self.sim.stats.reset()
        self.sim.tasks.hooks.reset()
        if body.get("tasks") is True:
            self.sim.tasks.store.clear()
        return json_response({"ok": True})

    async def faults(self, request: Request) -> Response:
        sim = self.sim
        if request.method == "POST":
            body = await self._body(request)
            unknown = sorted(set(body) - set(RUNTIME_FIELDS))
            if unknown:
                return json_response({"error": f"unknown fields: {', '.join(unknown)}"}, 400)
            try:
                sim.settings = dataclasses.replace(sim.settings, **body)
            except (TypeError, ValueError) as exc:
                return json_response({"error": str(exc)}, 400)
        return json_response({name: getattr(sim.settings, name) for name in RUNTIME_FIELDS})

    async def seed_task(self, request: Request) -> Response:
        sim = self.sim
        body = await self._body(request)
        now = time.time()
        task_id = body.get("id")
        if body.pop("playing", False) is True:
            outcome, seconds = body.pop("outcome", None), body.pop("task_seconds", None)
            extra = {k: v for k, v in body.items() if k not in ("action", "prompt")}
            task = sim.tasks.new_task(
                str(body.get("action") or "IMAGINE"),
                str(body.get("prompt") or "a simulated task"),
                body,
                now=now,
                task_id=str(task_id) if task_id else None,
                extra=extra,
            )
            if outcome in ("SUCCESS", "FAILURE"):
                task.fail_reason = FAIL_REASONS[0] if outcome == "FAILURE" else None
            if isinstance(seconds, int | float) and seconds >= 0:
                task.duration = float(seconds)
        elif not isinstance(task_id, str) or not task_id:
            return json_response({"error": "a seeded task needs a string id"}, 400)
        else:
            task = seeded_task(body, now=now, art=Art(sim.rng), ttl_s=sim.settings.image_ttl_s)
        sim.tasks.store.add(task, now)
        return Response(task.body_bytes(now), media_type="application/json")

    async def get_task(self, request: Request) -> Response:
        task = self.sim.tasks.store.get(request.path_params["id"])
        if task is None:
            return json_response({"error": "no such task"}, 404)
        return Response(task.body_bytes(time.time()), media_type="application/json")

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/_sim/health", self.health, methods=["GET"]),
            Route("/_sim/stats", self.stats, methods=["GET"]),
            Route("/_sim/reset", self.reset, methods=["POST"]),
            Route("/_sim/faults", self.faults, methods=["GET", "POST"]),
            Route("/_sim/tasks", self.seed_task, methods=["POST"]),
            Route("/_sim/tasks/{id}", self.get_task, methods=["GET"]),
        ]
