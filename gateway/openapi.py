"""The gateway's public API as an OpenAPI 3.1 document, served at ``/openapi.json``.

The document is built from the route table itself: every route is looked up, by its path
without the speed-mode prefix, in ``_OPERATIONS``, the request and answer shapes of each
route family. A route with no entry there stops start-up, so the document cannot fall
behind the routes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import __version__
from gateway.config import Config
from gateway.protocol import MODES, STATUSES, TASK_ID_PATTERN
from gateway.query import MAX_DEPTH, SORT_FIELDS

__all__ = ["OPENAPI_PATH", "SUBMIT_FIELDS", "document", "openapi_route"]

OPENAPI_PATH = "/openapi.json"
_REF = "#/components"
Schema = dict[str, Any]


# The JSON types of the submit fields the gateway checks (gateway.validation refuses others).
SUBMIT_FIELDS = {
    "prompt": "string",
    "taskId": "string",
    "customId": "string",
    "action": "string",
    "index": "integer",
    "content": "string",
    "base64": "string",
    "base64Array": "array",
    "maskBase64": "string",
    "sourceBase64": "string",
    "targetBase64": "string",
    "notifyHook": "string",
    "state": "string",
    "dimensions": "string",
    "botType": "string",
    "accountFilter": "object",
}


def openapi_route(routes: Sequence[BaseRoute], config: Config) -> Route:
    """``GET /openapi.json``: the document for ``routes`` and this route, built once."""

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    route = Route(OPENAPI_PATH, openapi, methods=["GET"])
    body = orjson.dumps(document([*routes, route], config))
    return route


def document(routes: Sequence[BaseRoute], config: Config) -> dict[str, Any]:
    """The OpenAPI 3.1 document describing ``routes`` as ``config`` sets them up."""
    paths: dict[str, dict[str, Any]] = {}
    for route in routes:
        if not isinstance(route, Route):
            raise ValueError(f"cannot describe route {route!r}")
        mode, family = _family(route.path, config)
        methods = sorted((route.methods or {"GET"}) - {"HEAD"})
        item = paths.setdefault(route.path, {})
        for method in methods:
            build = _OPERATIONS.get((method, family))
            if build is None:
                raise ValueError(f"no OpenAPI description for {method} {family}")
            operation = build(config)
            operation["operationId"] = _operation_id(operation["operationId"], mode, route.path)
            item[method.lower()] = operation
        params = _path_parameters(route.path)
        if params:
            item["parameters"] = params
    doc: dict[str, Any] = {
        "openapi": "3.1.0",
        "info": {
            "title": "mjgate",
            "version": __version__,
            "description": _DESCRIPTION,
            "license": {"name": "Apache-2.0", "identifier": "Apache-2.0"},
        },
        "paths": paths,
        "components": _components(config),
        "security": [{"mjApiSecret": []}, {"bearerKey": []}],
    }
    if config.server.public_url:
        doc["servers"] = [{"url": config.server.public_url}]
    return doc


_DESCRIPTION = (
    "A caching gateway in front of midjourney-proxy-style task APIs. Present a client key as "
    "`mj-api-secret: KEY` or `Authorization: Bearer KEY`. Every error the gateway answers "
    "itself is JSON in the envelope's shape: `{code, description, result: null, request_id}` "
    "(`code` 3: not found, 4: the request must change, 9: an upstream or the gateway failed). "
    "Every route under `/mj` is also served under the speed-mode prefixes `/mj-fast`, "
    "`/mj-relax` and `/mj-turbo`, and is forwarded with the prefix kept."
)


def _family(path: str, config: Config) -> tuple[str, str]:
    """The speed mode of a route and its path without it (``passthrough`` and ``metrics``
    stand for the configured paths)."""
    if path in config.passthrough:
        return "", "passthrough"
    if config.metrics.enabled and path == config.metrics.path:
        return "", "metrics"
    for mode in MODES:
        if mode and path.startswith(f"{mode}/mj/"):
            return mode, path.removeprefix(mode)
    return "", path


def _operation_id(base: str, mode: str, path: str) -> str:
    if base.startswith("passthrough"):
        # One per configured path: the path makes it unique.
        return base + "_" + "".join(ch if ch.isalnum() else "_" for ch in path).strip("_")
    return base + mode.removeprefix("/mj-").capitalize()


def _path_parameters(path: str) -> list[Schema]:
    shapes: dict[str, tuple[str, Schema]] = {
        "task_id": ("The task's id.", _ref("TaskId")),
        "kind": (
            "The submit kind, forwarded as it is: `imagine`, `blend`, `describe`, `action`, ...",
            {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,39}$"},
        ),
        "action": (
            "The task action, forwarded to the task's owner: `image-seed`, `cancel`, ...",
            {"type": "string", "pattern": "^[a-z][a-z0-9-]{0,39}$"},
        ),
        "n": ("Which of the task's `imageUrls`, from 0.", {"type": "integer", "minimum": 0}),
        "upstream": ("The pushing upstream's name.", {"type": "string"}),
        "token": ("The upstream's push token, made by mjgate.", {"type": "string"}),
        "delivery_id": (
            "A delivery's webhook-id.",
            {"type": "string", "pattern": "^msg_[A-Za-z0-9_-]{1,64}$"},
        ),
    }
    params = []
    for name, (description, schema) in shapes.items():
        if f"{{{name}}}" in path:
            params.append(
                {
                    "name": name,
                    "in": "path",
                    "required": True,
                    "description": description,
                    "schema": schema,
                }
            )
    return params


def _ref(name: str, kind: str = "schemas") -> Schema:
    return {"$ref": f"{_REF}/{kind}/{name}"}


def _json(schema: Schema, description: str) -> Schema:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*statuses: int) -> dict[str, Schema]:
    return {str(status): _ref(str(status), "responses") for status in statuses}


# Every route behind a key: an unknown or missing key, ambiguous credentials, the rate limit.
_CALLER = (400, 401, 429)
# A route whose answer may depend on an upstream.
_UPSTREAM = (502, 503, 504)
# A route that reads a JSON body.
_BODY = (413,)


def _operation(
    operation_id: str,
    tag: str,
    summary: str,
    ok: Schema,
    errors: Sequence[int],
    body: Schema | None = None,
    public: bool = False,
) -> Schema:
    operation: Schema = {
        "operationId": operation_id,
        "tags": [tag],
        "summary": summary,
        "responses": {"200": ok, **_errors(*sorted(set(errors)))},
    }
    if body is not None:
        operation["requestBody"] = body
    if public:
        operation["security"] = []
    return operation


def _body(schema: Schema, required: bool = True) -> Schema:
    return {"required": required, "content": {"application/json": {"schema": schema}}}


def _fetch(config: Config) -> Schema:
    ok = _json(_ref("Task"), "The task, from the cache or from the upstream that owns it.")
    ok["headers"] = {"X-Cache": _ref("X-Cache", "headers")}
    return _operation("fetchTask", "tasks", "Fetch one task", ok, (*_CALLER, 404, *_UPSTREAM))


def _list_by_ids(name: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = _json(
            {"type": "array", "items": _ref("Task")},
            "The tasks found, in the order asked; unknown ids are left out.",
        )
        ok["headers"] = {"X-Gateway-Partial": _ref("X-Gateway-Partial", "headers")}
        return _operation(
            name,
            "tasks",
            "List tasks by id, across every upstream",
            ok,
            (*_CALLER, *_BODY, *_UPSTREAM),
            _body(_ref("IdsBody")),
        )

    return build


def _query(config: Config) -> Schema:
    ok = _json(_ref("Page"), "One page of the merged, sorted search.")
    ok["headers"] = {"X-Gateway-Partial": _ref("X-Gateway-Partial", "headers")}
    return _operation(
        "queryTasks",
        "tasks",
        "Search tasks, merged across upstreams and paged",
        ok,
        (*_CALLER, *_BODY, *_UPSTREAM),
        _body(_ref("QueryBody")),
    )


def _recent(name: str, summary: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = _json({"type": "array", "items": _ref("Task")}, "Tasks, merged across upstreams.")
        ok["headers"] = {"X-Gateway-Partial": _ref("X-Gateway-Partial", "headers")}
        return _operation(name, "tasks", summary, ok, (*_CALLER, *_UPSTREAM))

    return build


def _submit(name: str, summary: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = _json(_ref("SubmitEnvelope"), "The upstream's envelope, as it answered.")
        # An upstream's refusal in the envelope's shape is forwarded with its own status.
        refused = _json(
            {"anyOf": [_ref("Error"), _ref("SubmitEnvelope")]},
            "Refused by the gateway, or by the upstream in the envelope's shape.",
        )
        operation = _operation(
            name,
            "submit",
            summary,
            ok,
            (*_CALLER, *_BODY, *_UPSTREAM, 422),
            _body(_ref("SubmitBody")),
        )
        operation["parameters"] = [
            {
                "name": "Idempotency-Key",
                "in": "header",
                "required": False,
                "description": "The same key again within 24 h gets the first answer (with "
                "X-Mjgate-Deduplicated: true) and sends nothing; with another request, 422.",
                "schema": {"type": "string", "pattern": "^[ -~]{1,255}$"},  # printable ASCII
            }
        ]
        operation["responses"].update({"400": refused, "404": refused})
        return operation

    return build


def _task_action(method: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = {"description": "The owner upstream's answer, as it came."}
        body = _body({"type": "object"}, required=False) if method == "POST" else None
        errors = (*_CALLER, 404, *_UPSTREAM, *(_BODY if body else ()))
        operation = _operation(
            f"taskAction{method.capitalize()}",
            "actions",
            "Act on one task at the upstream that owns it",
            ok,
            errors,
            body,
        )
        operation["responses"]["default"] = ok
        return operation

    return build


def _passthrough(method: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = {"description": "One upstream's answer, as it came."}
        body = _body({"type": "object"}, required=False) if method == "POST" else None
        errors = (*_CALLER, *_UPSTREAM, *(_BODY if body else ()))
        operation = _operation(
            f"passthrough{method.capitalize()}",
            "passthrough",
            "Forwarded as it is to one upstream (config: passthrough)",
            ok,
            errors,
            body,
        )
        operation["responses"]["default"] = ok
        return operation

    return build


def _purge(config: Config) -> Schema:
    ok = _json(_ref("Purged"), "The ids dropped from every cache tier.")
    return _operation(
        "purgeCache",
        "admin",
        "Drop tasks from every cache tier (admin clients only)",
        ok,
        (*_CALLER, 403, *_BODY, 503),
        _body(_ref("IdsBody")),
    )


def _query_parameters(
    names: dict[str, str], schemas: dict[str, Schema] | None = None
) -> list[Schema]:
    """Optional query parameters: a description each, and a schema (a string unless given)."""
    return [
        {
            "name": name,
            "in": "query",
            "required": False,
            "description": text,
            "schema": (schemas or {}).get(name, {"type": "string"}),
        }
        for name, text in names.items()
    ]


_GROUP = "(day|client|action|upstream)"
_CLIENT_PARAM: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_.-]{1,64}$"}
_EPOCH_MS: Schema = {"type": "string", "pattern": "^[0-9]{1,15}$"}


def _usage(config: Config) -> Schema:
    ok = _json(_ref("Usage"), "Submits and their outcomes per group; text/csv with format=csv.")
    ok["content"]["text/csv"] = {"schema": {"type": "string"}}
    operation = _operation(
        "usage", "admin", "What each caller spent (admin clients only)", ok, (*_CALLER, 403, 503)
    )
    operation["parameters"] = _query_parameters(
        {
            "from": "First UTC day: YYYY-MM-DD or ISO-8601 (default: the 1st of to's month).",
            "to": "Last UTC day, included (default: today).",
            "client": "Only this client.",
            "group_by": "day, client, action, upstream, or several joined by commas.",
            "format": "json (default) or csv.",
        },
        {
            "from": {"type": "string", "format": "date"},
            "to": {"type": "string", "format": "date"},
            "client": _CLIENT_PARAM,
            "group_by": {"type": "string", "pattern": f"^{_GROUP}(,{_GROUP})*$"},
            "format": {"enum": ["json", "csv"]},
        },
    )
    return operation


def _task_log(config: Config) -> Schema:
    ok = _json(_ref("TaskLog"), "Ledger records, newest first, with the next page's cursor.")
    operation = _operation(
        "taskLog",
        "admin",
        "The task log from the ledger (admin clients only)",
        ok,
        (*_CALLER, 403, 503),
    )
    operation["parameters"] = _query_parameters(
        {
            "client": "Only this client's tasks.",
            "status": "Only tasks last seen in this status.",
            "action": "Only this action (IMAGINE, UPSCALE, ...).",
            "since": "Submitted at or after: ISO-8601 or epoch ms.",
            "until": "Submitted at or before: ISO-8601 or epoch ms.",
            "limit": "At most this many (1-1000, default 100).",
            "cursor": "next_cursor of the previous page.",
            "state": "stuck: tasks not finished ledger.stuck_after_s after their submit.",
        },
        {
            "client": _CLIENT_PARAM,
            "status": {"enum": sorted(STATUSES)},
            "action": {"type": "string", "pattern": "^[A-Z][A-Z_]{0,31}$"},
            "since": _EPOCH_MS,
            "until": _EPOCH_MS,
            "limit": {"type": "integer", "minimum": 1, "maximum": 1000},
            "cursor": {"type": "string", "pattern": "^[0-9]{1,15}[.][a-z0-9_-]+/[A-Za-z0-9_-]+$"},
            "state": {"enum": ["stuck"]},
        },
    )
    return operation


def _image(name: str, summary: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = {
            "description": "The image (206 for a Range request; 304 when not modified).",
            "content": {"image/*": {"schema": {"type": "string", "format": "binary"}}},
        }
        errors = (*_CALLER, 403, 404, *_UPSTREAM)
        operation = _operation(name, "images", summary, ok, errors)
        operation["parameters"] = _query_parameters(
            {
                "exp": "A signed URL's expiry (Unix seconds); with sig, no key is needed.",
                "sig": "A signed URL's signature (made by mjgate, images.rewrite).",
            }
        )
        operation["security"] = [{"mjApiSecret": []}, {"bearerKey": []}, {}]
        return operation

    return build


def _task_events(config: Config) -> Schema:
    ok = {
        "description": "The task's states as Server-Sent Events, one per change, each with "
        "an id for Last-Event-ID; the stream ends after the terminal state.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
    operation = _operation(
        "taskEvents",
        "tasks",
        "Stream a task's changes (Server-Sent Events)",
        ok,
        (*_CALLER, 404, *_UPSTREAM),
    )
    operation["parameters"] = _query_parameters(
        {"token": "A stream token from POST .../events/token: then no key is needed."}
    )
    operation["security"] = [{"mjApiSecret": []}, {"bearerKey": []}, {}]
    return operation


def _events_token(config: Config) -> Schema:
    token = {
        "type": "object",
        "required": ["token", "expires_at", "url"],
        "properties": {
            "token": {"type": "string"},
            "expires_at": {"type": "integer", "description": "Unix seconds."},
            "url": {"type": "string", "description": "The stream's path with the token."},
        },
    }
    return _operation(
        "taskEventsToken",
        "tasks",
        "A short-lived token for a browser's EventSource on the task's stream",
        _json(token, "The token, for ?token= on the stream URL."),
        (*_CALLER, 404, *_UPSTREAM),
    )


def _notify(config: Config) -> Schema:
    return _operation(
        "upstreamNotify",
        "push",
        "An upstream pushing a task's change (upstreams[].push; the URL is the credential)",
        _json({"type": "object"}, "Taken."),
        (400, 404, *_BODY),
        _body(_ref("Task")),
        public=True,
    )


_DELIVERY: Schema = {
    "type": "object",
    "required": ["id", "task_id", "url", "attempts", "state", "last_error"],
    "properties": {
        "id": {"type": "string", "description": "The webhook-id, the same on every attempt."},
        "task_id": {"type": "string"},
        "client": {"type": "string"},
        "url": {"type": "string"},
        "attempts": {"type": "integer"},
        "state": {"enum": ["pending", "dead"]},
        "last_error": {"type": "string"},
        "created_at": {"type": "number"},
        "next_at": {"type": "number"},
    },
}


def _webhooks(config: Config) -> Schema:
    listing = {
        "type": "object",
        "required": ["deliveries"],
        "properties": {"deliveries": {"type": "array", "items": _DELIVERY}},
    }
    operation = _operation(
        "webhookDeliveries",
        "admin",
        "Task callbacks pending or dead-lettered (admin clients only)",
        _json(listing, "The deliveries, oldest first."),
        (*_CALLER, 403, 503),
    )
    operation["parameters"] = [
        {
            "name": "state",
            "in": "query",
            "required": False,
            "description": "pending (default) or dead.",
            "schema": {"enum": ["pending", "dead"]},
        },
        {
            "name": "limit",
            "in": "query",
            "required": False,
            "description": "At most this many (default 100).",
            "schema": {"type": "integer", "minimum": 1, "maximum": 1000},
        },
    ]
    return operation


def _webhook_retry(config: Config) -> Schema:
    retried = {"type": "object", "required": ["delivery"], "properties": {"delivery": _DELIVERY}}
    return _operation(
        "retryWebhook",
        "admin",
        "Deliver a dead letter again (admin clients only)",
        _json(retried, "Queued again, its attempts counted from zero."),
        (*_CALLER, 403, 404, 503),
    )


def _healthz(config: Config) -> Schema:
    ok = _json(_ref("Health"), "The process answers.")
    return _operation("healthz", "health", "Liveness", ok, (), public=True)


def _readyz(config: Config) -> Schema:
    operation = _operation(
        "readyz",
        "health",
        "Readiness: the store answers; upstream circuits are reported",
        _json(_ref("Ready"), "Ready."),
        (),
        public=True,
    )
    operation["responses"]["503"] = _json(_ref("Ready"), "Not ready: the store is unreachable.")
    return operation


def _metrics(config: Config) -> Schema:
    ok = {
        "description": "Prometheus text exposition.",
        "content": {"text/plain": {"schema": {"type": "string"}}},
    }
    token = bool(config.metrics.token.reveal())
    operation = _operation(
        "metrics", "health", "Prometheus metrics", ok, (401,) if token else (), public=True
    )
    if token:
        operation["security"] = [{"metricsToken": []}]
    return operation


def _openapi(config: Config) -> Schema:
    ok = _json({"type": "object"}, "This document.")
    return _operation("openapi", "health", "The OpenAPI document", ok, (), public=True)


_OPERATIONS: dict[tuple[str, str], Callable[[Config], Schema]] = {
    ("GET", "/mj/task/{task_id}/fetch"): _fetch,
    ("POST", "/mj/task/list-by-condition"): _list_by_ids("listByCondition"),
    ("POST", "/mj/task/list-by-ids"): _list_by_ids("listByIds"),
    ("POST", "/mj/task/query"): _query,
    ("GET", "/mj/task/list"): _recent("listRecent", "The most recent tasks"),
    ("GET", "/mj/task/queue"): _recent("listQueue", "The tasks not finished yet"),
    ("POST", "/mj/submit/{kind}"): _submit("submit", "Create work at an upstream"),
    ("POST", "/mj/insight-face/{kind}"): _submit("insightFace", "Create face-swap work"),
    ("GET", "/mj/task/{task_id}/events"): _task_events,
    ("POST", "/mj/task/{task_id}/events/token"): _events_token,
    ("POST", "/mj/notify/{upstream}/{token}"): _notify,
    ("GET", "/admin/webhooks"): _webhooks,
    ("POST", "/admin/webhooks/{delivery_id}/retry"): _webhook_retry,
    ("GET", "/mj/task/{task_id}/{action}"): _task_action("GET"),
    ("POST", "/mj/task/{task_id}/{action}"): _task_action("POST"),
    ("GET", "/mj/image/{task_id}"): _image("image", "A task's image, kept by mjgate"),
    ("GET", "/mj/image/{task_id}/{n}"): _image("imageN", "One of a task's imageUrls"),
    ("POST", "/admin/cache/purge"): _purge,
    ("GET", "/admin/usage"): _usage,
    ("GET", "/admin/tasks"): _task_log,
    ("GET", "passthrough"): _passthrough("GET"),
    ("POST", "passthrough"): _passthrough("POST"),
    ("GET", "/healthz"): _healthz,
    ("GET", "/readyz"): _readyz,
    ("GET", "metrics"): _metrics,
    ("GET", OPENAPI_PATH): _openapi,
}

_ERROR_STATUSES = {
    400: "The request must change (a bad id, body or field; ambiguous credentials).",
    401: "No key, or an unknown key.",
    403: "The client may not use this route.",
    404: "No such task (or parent task).",
    413: "The body is larger than server.max_body_bytes.",
    422: "The Idempotency-Key was used before with a different request.",
    429: "Over the client's rate limit; see Retry-After.",
    502: "An upstream gave no usable answer.",
    503: "No upstream could take the request (circuits open, caps full, store down).",
    504: "Every upstream asked timed out.",
}

_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
_SORT_PATTERN = (
    r"^$|^\s*(" + "|".join(sorted(SORT_FIELDS)) + r")\s*(,\s*([Aa][Ss][Cc]|[Dd][Ee][Ss][Cc])?\s*)?$"
)
_NULLABLE_INT: Schema = {"type": ["integer", "null"]}


def _components(config: Config) -> Schema:
    task_id: Schema = {
        "type": "string",
        "pattern": f"^{TASK_ID_PATTERN}$",
        "description": "1-64 characters of A-Z a-z 0-9 _ -",
    }
    statuses = sorted(STATUSES)
    ids: Schema = {"type": "array", "items": _ref("TaskId"), "maxItems": config.fanout.max_ids}
    schemas: dict[str, Schema] = {
        "TaskId": task_id,
        "Error": {
            "type": "object",
            "required": ["code", "description", "result", "request_id"],
            "properties": {
                "code": {"type": "integer", "description": "3 not found, 4 bad request, 9 failed"},
                "description": {"type": "string"},
                "result": {"type": "null"},
                "request_id": {"type": "string"},
            },
        },
        "Task": {
            "type": "object",
            "required": ["id"],
            "properties": {
                "id": {"type": "string"},
                "action": _NULLABLE_STRING,
                "status": {"type": ["string", "null"], "examples": statuses},
                "prompt": _NULLABLE_STRING,
                "promptEn": _NULLABLE_STRING,
                "description": _NULLABLE_STRING,
                "state": _NULLABLE_STRING,
                "submitTime": _NULLABLE_INT,
                "startTime": _NULLABLE_INT,
                "finishTime": _NULLABLE_INT,
                "imageUrl": _NULLABLE_STRING,
                "progress": _NULLABLE_STRING,
                "failReason": _NULLABLE_STRING,
                "properties": {"type": ["object", "null"]},
            },
        },
        "IdsBody": {"type": "object", "required": ["ids"], "properties": {"ids": ids}},
        "QueryBody": {
            "type": "object",
            "description": "A field that is null or empty filters nothing. The page asked "
            f"for may not reach past row {MAX_DEPTH}: (pageNumber + 1) * pageSize <= {MAX_DEPTH}.",
            "properties": {
                "pageNumber": {"type": ["integer", "null"], "minimum": 0},
                "pageSize": {"type": ["integer", "null"], "minimum": 1, "maximum": MAX_DEPTH},
                "sort": {
                    "type": ["string", "null"],
                    "description": "FIELD,asc or FIELD,desc (default submitTime,desc)",
                    "pattern": _SORT_PATTERN,
                },
                "id": {"anyOf": [_ref("TaskId"), {"enum": ["", None]}]},
                "ids": {"anyOf": [ids, {"type": "null"}]},
                "status": {"enum": [*statuses, "", None]},
                "statusSet": {
                    "type": ["array", "null"],
                    "items": {"type": "string", "enum": statuses},
                },
                **{
                    name: _NULLABLE_STRING
                    for name in ("action", "state", "prompt", "promptEn", "description")
                },
                "failReason": _NULLABLE_STRING,
            },
        },
        "Page": {
            "type": "object",
            "required": ["content", "totalElements", "totalPages", "number", "size"],
            "properties": {
                "content": {"type": "array", "items": _ref("Task")},
                "totalElements": {"type": "integer"},
                "totalPages": {"type": "integer"},
                "number": {"type": "integer"},
                "size": {"type": "integer"},
                "numberOfElements": {"type": "integer"},
                "first": {"type": "boolean"},
                "last": {"type": "boolean"},
                "empty": {"type": "boolean"},
            },
        },
        "SubmitBody": {
            "type": "object",
            "description": "Fields the gateway checks; unknown fields are forwarded as they are.",
            "properties": {
                **{name: {"type": [kind, "null"]} for name, kind in SUBMIT_FIELDS.items()},
                "taskId": {
                    "anyOf": [_ref("TaskId"), {"type": "null"}],
                    "description": "The task a follow-up (action, modal, change) acts on.",
                },
            },
        },
        "SubmitEnvelope": {
            "type": "object",
            "required": ["code"],
            "description": "midjourney-proxy's `{code, description, result}`, or the C# "
            "upstream's `{success, code, message}`. `code` 1, 21 and 22: the work was taken.",
            "properties": {
                "code": {"type": "integer"},
                "description": _NULLABLE_STRING,
                "message": _NULLABLE_STRING,
                "result": {},
                "properties": {"type": ["object", "null"]},
            },
        },
        "Purged": {
            "type": "object",
            "required": ["purged", "absent"],
            "properties": {
                "purged": {
                    "description": "Ids the store held an answer for, now dropped.",
                    "type": "array",
                    "items": _ref("TaskId"),
                },
                "absent": {
                    "description": "Ids it held nothing for (dropped from every tier too).",
                    "type": "array",
                    "items": _ref("TaskId"),
                },
            },
        },
        "Usage": {
            "type": "object",
            "required": ["from", "to", "group_by", "rows", "totals"],
            "properties": {
                "from": {"type": "string"},
                "to": {"type": "string"},
                "group_by": {"type": "array", "items": {"type": "string"}},
                "rows": {"type": "array", "items": {"type": "object"}},
                "totals": {"type": "object"},
            },
        },
        "TaskLog": {
            "type": "object",
            "required": ["tasks", "next_cursor"],
            "properties": {
                "tasks": {"type": "array", "items": {"type": "object"}},
                "next_cursor": _NULLABLE_STRING,
            },
        },
        "Health": {
            "type": "object",
            "required": ["status"],
            "properties": {"status": {"const": "ok"}},
        },
        "Ready": {
            "type": "object",
            "required": ["status", "store", "upstreams"],
            "properties": {
                "status": {"enum": ["ready", "not ready"]},
                "store": {"enum": ["ok", "unreachable"]},
                "upstreams": {
                    "type": "object",
                    "additionalProperties": {"enum": ["closed", "open", "half_open"]},
                },
            },
        },
    }
    responses = {
        str(status): _json(_ref("Error"), description)
        for status, description in _ERROR_STATUSES.items()
    }
    headers = {
        "X-Cache": {
            "description": "HIT, MISS or PARTIAL: whether the answer came from the cache.",
            "schema": {"type": "string"},
        },
        "X-Gateway-Partial": {
            "description": "Upstreams that did not answer in time: the list may lack tasks.",
            "schema": {"type": "string"},
        },
    }
    security = {
        "mjApiSecret": {"type": "apiKey", "in": "header", "name": "mj-api-secret"},
        "bearerKey": {"type": "http", "scheme": "bearer"},
        "metricsToken": {"type": "http", "scheme": "bearer"},
    }
    return {
        "schemas": schemas,
        "responses": responses,
        "headers": headers,
        "securitySchemes": security,
    }
