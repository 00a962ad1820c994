"""The route table, stated once: every route family under every speed-mode prefix."""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route
from starlette.types import Scope

from gateway.config import Config
from gateway.openapi import OPENAPI_PATH, openapi_route
from gateway.protocol import MODES
from gateway.push import NOTIFY_PREFIX
from gateway.routes import (
    actions,
    admin,
    events,
    health,
    images,
    ledger,
    notify,
    submit,
    tasks,
    webhooks,
)

__all__ = ["keyless", "public_paths", "route_table"]

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
            # Before the task actions, whose {action} would take "events".
            Route(f"{base}/task/{{task_id}}/events", bound(events.stream), methods=["GET"]),
            Route(
                f"{base}/task/{{task_id}}/events/token",
                bound(events.stream_token),
                methods=["POST"],
            ),
            Route(
                f"{base}/task/{{task_id}}/{{action}}",
                bound(actions.task_action),
                methods=["GET", "POST"],
            ),
        ]
    if config.images.enabled:
        routes += [
            Route("/mj/image/{task_id}", images.image, methods=["GET"]),
            Route("/mj/image/{task_id}/{n}", images.image, methods=["GET"]),
        ]
    routes.append(Route("/admin/cache/purge", admin.purge, methods=["POST"]))
    routes += [Route("/admin/usage", ledger.usage), Route("/admin/tasks", ledger.tasks)]
    routes += [
        Route("/admin/webhooks", webhooks.deliveries),
        Route("/admin/webhooks/{delivery_id}/retry", webhooks.retry, methods=["POST"]),
    ]
    if any(upstream.push for upstream in config.upstreams):
        routes.append(
            Route(f"{NOTIFY_PREFIX}{{upstream}}/{{token}}", notify.notify, methods=["POST"])
        )
    routes += [
        Route(path, actions.passthrough, methods=["GET", "POST"]) for path in config.passthrough
    ]
    routes += [Route("/healthz", health.healthz), Route("/readyz", health.readyz)]
    if config.metrics.enabled:
        token = config.metrics.token.reveal()
        routes.append(Route(config.metrics.path, health.metrics_endpoint(token)))
    routes.append(openapi_route(routes, config))
    return routes


def keyless(scope: Scope) -> bool:
    """Requests whose route checks a credential of their own instead of a caller's key: an
    upstream's push URL, a browser's stream token."""
    return scope["path"].startswith(NOTIFY_PREFIX) or events.has_stream_token(scope)


def public_paths(config: Config) -> frozenset[str]:
    """Paths served without a caller key and without an access-log line."""
    return frozenset({"/healthz", "/readyz", config.metrics.path, OPENAPI_PATH})
