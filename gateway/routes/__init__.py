"""The route table, stated once: every route family under every speed-mode prefix."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway.config import Config
from gateway.protocol import MODES
from gateway.routes import actions, admin, health, submit, tasks

__all__ = ["public_paths", "route_table"]

ModeEndpoint = Callable[[str, Request], Awaitable[Response]]


def route_table(config: Config) -> list[BaseRoute]:
    """Every route the gateway serves; the task routes first, since the cached fetch is the
    request the team makes most."""
    routes: list[BaseRoute] = []
    for mode in MODES:
        base = f"{mode}/mj"

        def bound(endpoint: ModeEndpoint, mode: str = mode) -> Callable[..., Awaitable[Response]]:
            return functools.partial(endpoint, mode)

        routes += [
            Route(f"{base}/task/{{task_id}}/fetch", bound(tasks.fetch), methods=["GET"]),
            Route(f"{base}/task/list-by-condition", bound(tasks.list_by_ids), methods=["POST"]),
            Route(f"{base}/task/list-by-ids", bound(tasks.list_by_ids), methods=["POST"]),
            Route(f"{base}/task/query", bound(tasks.query), methods=["POST"]),
            Route(f"{base}/task/list", bound(tasks.recent), methods=["GET"]),
            Route(f"{base}/task/queue", bound(tasks.recent), methods=["GET"]),
            Route(f"{base}/submit/{{kind}}", bound(submit.submit), methods=["POST"]),
            Route(f"{base}/insight-face/{{kind}}", bound(submit.submit), methods=["POST"]),
            Route(
                f"{base}/task/{{task_id}}/{{action}}",
                bound(actions.task_action),
                methods=["GET", "POST"],
            ),
        ]
    routes.append(Route("/admin/cache/purge", admin.purge, methods=["POST"]))
    routes += [
        Route(path, actions.passthrough, methods=["GET", "POST"]) for path in config.passthrough
    ]
    routes += [Route("/healthz", health.healthz), Route("/readyz", health.readyz)]
    if config.metrics.enabled:
        token = config.metrics.token.reveal()
        routes.append(Route(config.metrics.path, health.metrics_endpoint(token)))
    return routes


def public_paths(config: Config) -> frozenset[str]:
    """Paths served without a caller key and without an access-log line."""
    return frozenset({"/healthz", "/readyz", config.metrics.path})
