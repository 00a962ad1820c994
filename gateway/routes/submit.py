"""Creating work: ``/mj/submit/*`` and ``/mj/insight-face/*``, with the failover rules.

A new task goes to an upstream picked by weight; a follow-up (action, modal, change...) to
the upstream that owns its parent. A submit moves to the next upstream only when the one
asked surely did not take the work; after a timeout the work may exist, and sending it again
could pay for the same image twice, so that fails instead.

Around that: a duplicate of a submit gets the first one's answer (``gateway.dedup``), a
parent the caller may not see is not found, a quota unit is reserved before anything is sent
and given back when the upstream did not take the work, and an accepted submit is recorded
with its submitter (owner map and ledger).
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response

from gateway.auth import caller
from gateway.config import ClientConfig
from gateway.context import RequestInfo, request_info
from gateway.errors import GatewayError, UpstreamError, UpstreamFailures
from gateway.ledger import Submitted, action_of
from gateway.metrics import SUBMITS, submit_code
from gateway.owners import Owner
from gateway.protocol import ACCEPTED_CODES
from gateway.quota import QuotaRefusal, Reservation
from gateway.routes.common import allowed, forward, services
from gateway.services import Services
from gateway.tasks import valid_task_id
from gateway.upstreams import Upstream, UpstreamResponse, call
from gateway.validation import NAME_SEGMENT, check_submit_fields, parent_task_id, read_json_object

__all__ = ["accepted_task_id", "should_fail_over", "submit"]


async def submit(mode: str, request: Request) -> Response:
    """Send new work to an upstream that takes it, once however often it is sent."""
    kind = request.path_params["kind"]
    if not NAME_SEGMENT.fullmatch(kind):
        raise GatewayError(404, f"unknown submit route: {kind!r}")
    svc = services(request)
    data = await read_json_object(request, svc.config.server.max_body_bytes)
    check_submit_fields(data)
    run = functools.partial(_submit, mode, kind, request, data)
    idempotency_key = request.headers.get("idempotency-key")
    key = svc.dedup.key_for(caller(request.scope).name, request.url.path, data, idempotency_key)
    if key is None:
        return (await run())[0]
    return await svc.dedup.once(key, run, request_info(request.scope).request_id)


async def _submit(
    mode: str, kind: str, request: Request, data: dict[str, Any]
) -> tuple[Response, bool]:
    """The submit, and whether its answer is one to give duplicates (something was sent)."""
    svc = services(request)
    info = request_info(request.scope)
    client = caller(request.scope)
    candidates = allowed(request)
    parent = parent_task_id(kind, data)
    if parent is not None:
        visible = await svc.visibility.check(client, parent)
        owner = await svc.lookup.owner_of(mode, parent, candidates, info) if visible else None
        if owner is None:
            raise GatewayError(404, f"parent task {parent} not found")
        targets = [owner]
    else:
        targets = svc.pool.submit_order(candidates)
    if not targets:
        raise GatewayError(503, "no upstream is available for submits")
    # A modal confirms a task its own submit already paid for.
    held = await svc.quotas.reserve(client) if kind != "modal" else Reservation(client.name, ())
    if isinstance(held, QuotaRefusal):
        return held.response(info.request_id, datetime.now(UTC)), False
    hook = _callback_url(data, client)
    for target in targets:
        await svc.pushes.submitting(target.config)
    try:
        response = await _submit_to(targets, request.url.path, _body_for(svc, data), info)
    except UpstreamFailures as exc:
        if not any(error.sent for error in exc.errors):
            await svc.quotas.release(held)
        raise
    envelope = _envelope(response)
    code = envelope.get("code") if envelope else None
    SUBMITS.labels(response.upstream, submit_code(code)).inc()
    task_id = accepted_task_id(response)
    if task_id is None and (envelope is not None or response.status in (429, 503)):
        await svc.quotas.release(held)  # the upstream said it took no work
    if envelope is None:
        raise _not_an_envelope(response)
    if task_id is not None and kind == "modal":
        await svc.owners.record(task_id, response.upstream)
    elif task_id is not None:
        await svc.owners.record_submit(task_id, Owner(response.upstream, client.name, client.team))
        prompt = data.get("prompt")
        accepted = Submitted(
            task_id=task_id,
            upstream=response.upstream,
            client=client,
            action=action_of(kind, data),
            parent=parent,
            mode=mode,
            code=int(envelope["code"]),
            prompt=prompt if isinstance(prompt, str) else None,
            quota_periods=held.periods,
            submit_ms=int(time.time() * 1000),
        )
        await svc.ledger.record(accepted)
    if task_id is not None and hook is not None:
        await svc.deliveries.register(task_id, client.name, hook)
    return forward(response), True


def _callback_url(data: dict[str, Any], client: ClientConfig) -> str | None:
    """The caller's callback URL, taken out of the body: a submit's ``notifyHook``, else the
    client's ``webhook.url``. mjgate delivers callbacks itself; an upstream never sees it."""
    hook = data.pop("notifyHook", None)
    if isinstance(hook, str) and hook.strip():
        return hook.strip()
    return client.webhook.url or None


def _body_for(svc: Services, data: dict[str, Any]) -> Callable[[Upstream], bytes]:
    """The body for each upstream: with mjgate's own hook for an upstream that pushes."""
    plain = orjson.dumps(data)

    def body(upstream: Upstream) -> bytes:
        hook = svc.pushes.hook_url(upstream.name)
        return plain if hook is None else orjson.dumps({**data, "notifyHook": hook})

    return body


def _not_an_envelope(response: UpstreamResponse) -> GatewayError:
    """A submit's answer that is not the envelope: the caller gets mjgate's JSON error, never
    an upstream's HTML or a bare 5xx that an SDK would retry (and pay for twice)."""
    name = response.upstream
    if response.status in (429, 503):
        return GatewayError(503, f"upstream {name}: refused the submit (HTTP {response.status})")
    detail = f"answered HTTP {response.status} with something other than a submit envelope"
    return UpstreamFailures([UpstreamError(name, "broken", True, detail)])


async def _submit_to(
    targets: Sequence[Upstream], path: str, body: Callable[[Upstream], bytes], info: RequestInfo
) -> UpstreamResponse:
    """Send to the first target that takes it.

    Moves on only when the upstream surely did not take the work: a queue-full answer,
    429/503, or a connection that never opened.
    """
    refused: list[UpstreamError] = []
    response: UpstreamResponse | None = None
    for upstream in targets:
        try:
            response = await call(upstream, info, "submit", "POST", path, body(upstream))
        except UpstreamError as exc:
            if exc.sent:
                raise UpstreamFailures([exc]) from None
            refused.append(exc)
            continue
        if not should_fail_over(response):
            return response
    if response is not None:
        return response
    raise UpstreamFailures(refused)


def _envelope(response: UpstreamResponse) -> dict[str, Any] | None:
    """The envelope ``{code, description, result, ...}`` (or the C# upstream's
    ``{success, code, message}``) in a 200 or 4xx answer; None for anything else."""
    if response.status >= 500 or response.status < 200 or 300 <= response.status < 400:
        return None
    try:
        data = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(data, dict):
        return None
    code = data.get("code")
    return data if isinstance(code, int) and not isinstance(code, bool) else None


def should_fail_over(response: UpstreamResponse) -> bool:
    """Did the upstream refuse the work without doing any of it?"""
    if response.status in (429, 503):
        return True
    envelope = _envelope(response)
    if envelope is None:
        return False
    code = envelope.get("code")
    if code == 23:
        return True
    # The C# upstream reports a full queue as a plain system error.
    description = str(envelope.get("description") or envelope.get("message") or "").lower()
    return code == 9 and ("queue" in description or "队列" in description)


def accepted_task_id(response: UpstreamResponse) -> str | None:
    """The new task's id when the envelope says the submit was taken."""
    envelope = _envelope(response) if response.status == 200 else None
    if envelope is None or envelope.get("code") not in ACCEPTED_CODES:
        return None
    result = envelope.get("result")
    task_id = str(result) if isinstance(result, int | str) and not isinstance(result, bool) else ""
    return task_id if valid_task_id(task_id) else None
