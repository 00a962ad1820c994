"""The gateway's public API as an OpenAPI 3.1 document, served at ``/openapi.json``.

The document is built from the route table itself: every route is looked up, by its path
without the speed-mode prefix, in ``_OPERATIONS``, the request and answer shapes of each
route family. A route with no entry there stops start-up, so the document cannot fall
behind the routes.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route

from gateway import __version__
from gateway.config import Config
from gateway.protocol import MODES, STATUSES, TASK_ID_PATTERN

__all__ = ["OPENAPI_PATH", "document", "openapi_route"]

OPENAPI_PATH = "/openapi.json"
_REF = "#/components"
Schema = dict[str, Any]


def openapi_route(routes: Sequence[BaseRoute], config: Config) -> Route:
    """``GET /openapi.json``: the document for ``routes`` and this route, built once."""
    own = Route(OPENAPI_PATH, _placeholder, methods=["GET"])
    body = orjson.dumps(document([*routes, own], config))

    async def openapi(request: Request) -> Response:
        return Response(body, media_type="application/json")

    return Route(OPENAPI_PATH, openapi, methods=["GET"])


async def _placeholder(request: Request) -> Response:
    raise AssertionError("never served: stands for /openapi.json while it is documented")


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
    if base == "passthrough":
        slug = "".join(ch if ch.isalnum() else "_" for ch in path).strip("_")
        return f"passthrough_{slug}"
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
    return _operation(
        "fetchTask", "tasks", "Fetch one task", ok, (*_CALLER, 404, *_UPSTREAM)
    )


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
            {"oneOf": [_ref("Error"), _ref("SubmitEnvelope")]},
            "Refused by the gateway, or by the upstream in the envelope's shape.",
        )
        operation = _operation(
            name,
            "submit",
            summary,
            ok,
            (*_CALLER, *_BODY, *_UPSTREAM),
            _body(_ref("SubmitBody")),
        )
        operation["responses"].update({"400": refused, "404": refused})
        return operation

    return build


def _task_action(method: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = {"description": "The owner upstream's answer, as it came."}
        body = _body({"type": "object"}, required=False) if method == "POST" else None
        errors = (*_CALLER, 404, *_UPSTREAM, *(_BODY if body else ()))
        return _operation(
            f"taskAction{method.capitalize()}",
            "actions",
            "Act on one task at the upstream that owns it",
            ok,
            errors,
            body,
        )

    return build


def _passthrough(method: str) -> Callable[[Config], Schema]:
    def build(config: Config) -> Schema:
        ok = {"description": "One upstream's answer, as it came."}
        body = _body({"type": "object"}, required=False) if method == "POST" else None
        errors = (*_CALLER, *_UPSTREAM, *(_BODY if body else ()))
        operation = _operation(
            "passthrough", "passthrough", "Forwarded as it is (config: passthrough)", ok, errors,
            body,
        )
        operation["x-method"] = method
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
    ("GET", "/mj/task/{task_id}/{action}"): _task_action("GET"),
    ("POST", "/mj/task/{task_id}/{action}"): _task_action("POST"),
    ("POST", "/admin/cache/purge"): _purge,
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
    429: "Over the client's rate limit; see Retry-After.",
    502: "An upstream gave no usable answer.",
    503: "No upstream could take the request (circuits open, caps full, store down).",
    504: "Every upstream asked timed out.",
}

_NULLABLE_STRING: Schema = {"type": ["string", "null"]}
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
            "properties": {
                "pageNumber": {"type": "integer", "minimum": 0},
                "pageSize": {"type": "integer", "minimum": 1},
                "sort": {"type": "string", "description": "FIELD,asc or FIELD,desc"},
                "id": _ref("TaskId"),
                "ids": ids,
                "status": {"type": "string", "enum": statuses},
                "statusSet": {"type": "array", "items": {"type": "string", "enum": statuses}},
                **{
                    name: {"type": "string"}
                    for name in ("action", "state", "prompt", "promptEn", "description")
                },
                "failReason": {"type": "string"},
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
            "properties": {name: {"type": kind} for name, kind in SUBMIT_FIELDS.items()},
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
            "required": ["purged"],
            "properties": {"purged": {"type": "array", "items": _ref("TaskId")}},
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
                    "additionalProperties": {"enum": ["closed", "open", "half-open"]},
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
