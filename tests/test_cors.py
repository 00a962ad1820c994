"""CORS from ``server.cors.allow_origins``: a browser's preflight is answered without a key,
every answer (refusals too) lets the page read the gateway's headers, other origins get
nothing, and without the setting there is no CORS at all."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.support import (
    CALLER_KEYS,
    GatewayThread,
    SimProcess,
    caller,
    make_config,
    running_gateway,
)

UI = "https://ui.example.com"
OTHER = "https://evil.example.net"
LIMITED_KEY = "limited-key-0123456789"
EXPOSED = {
    "x-request-id",
    "x-cache",
    "x-cache-tier",
    "x-gateway-partial",
    "ratelimit-limit",
    "ratelimit-remaining",
    "ratelimit-reset",
    "retry-after",
}
REQUESTED = "content-type, mj-api-secret, authorization, x-request-id, last-event-id"


def preflight(
    gateway: GatewayThread, path: str, origin: str, method: str = "POST", headers: str = REQUESTED
) -> httpx.Response:
    """What a browser sends before a cross-origin POST with a key and a JSON body."""
    return httpx.options(
        f"{gateway.url}{path}",
        headers={
            "Origin": origin,
            "Access-Control-Request-Method": method,
            "Access-Control-Request-Headers": headers,
        },
    )


def names(value: str) -> set[str]:
    return {name.strip().lower() for name in value.split(",")}


def limited_client() -> dict[str, object]:
    return {"name": "limited", "key": LIMITED_KEY, "rate_limit": {"rps": 0.001, "burst": 1}}


@pytest.fixture(scope="module")
def gateway(session_sims: list[SimProcess]) -> Iterator[GatewayThread]:
    config = make_config(
        session_sims,
        server={"cors": {"allow_origins": [UI]}},
        clients=[
            {"name": "alice", "key": CALLER_KEYS["alice"]},
            limited_client(),
        ],
    )
    with running_gateway(config) as running:
        yield running


def upstream_requests(sims: list[SimProcess]) -> int:
    return sum(int(sim.stats()["total"]) for sim in sims)


@pytest.mark.parametrize(
    "path", ["/mj/submit/imagine", "/mj/task/list-by-condition", "/mj-fast/mj/task/query"]
)
def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(
    gateway: GatewayThread, session_sims: list[SimProcess], path: str
) -> None:
    before = upstream_requests(session_sims)
    answer = preflight(gateway, path, UI)
    assert answer.status_code == 200
    assert answer.headers["access-control-allow-origin"] == UI
    assert names(answer.headers["access-control-allow-methods"]) == {"get", "post"}
    assert names(answer.headers["access-control-allow-headers"]) >= names(REQUESTED)
    assert "access-control-allow-credentials" not in answer.headers  # keys are headers
    assert "origin" in names(answer.headers["vary"])
    assert upstream_requests(session_sims) == before


@pytest.mark.parametrize(
    ("origin", "method", "headers", "refused"),
    [
        (OTHER, "POST", REQUESTED, "origin"),
        ("null", "GET", "mj-api-secret", "origin"),
        (UI, "DELETE", REQUESTED, "method"),
        (UI, "POST", "mj-api-secret, x-upstream-key", "headers"),
    ],
)
def test_a_preflight_outside_the_policy_is_refused_with_json(
    gateway: GatewayThread, origin: str, method: str, headers: str, refused: str
) -> None:
    answer = preflight(gateway, "/mj/submit/imagine", origin, method, headers)
    assert answer.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    body = answer.json()
    assert body["description"] == f"Disallowed CORS {refused}"
    assert body["result"] is None and body["request_id"] == answer.headers["x-request-id"]
    if refused == "origin":
        assert "access-control-allow-origin" not in answer.headers


def test_answers_to_an_allowed_origin_expose_the_gateways_headers(
    gateway: GatewayThread, session_sims: list[SimProcess]
) -> None:
    """The page can read the request id, cache and limit headers on a success, and the error
    (with Retry-After) on a refusal: without CORS headers there it would see a network error."""
    task_id = f"17{uuid.uuid4().int % 10**14:014d}"
    session_sims[0].seed(id=task_id, prompt="cors")
    origin = {"Origin": UI}
    answers = {
        "ok": httpx.get(
            f"{gateway.url}/mj/task/{task_id}/fetch", headers={**origin, **caller("alice")}
        ),
        "no key": httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=origin),
        "limited": httpx.get(
            f"{gateway.url}/mj/task/list", headers={**origin, "mj-api-secret": LIMITED_KEY}
        ),
    }
    answers["refused"] = httpx.get(
        f"{gateway.url}/mj/task/list", headers={**origin, "mj-api-secret": LIMITED_KEY}
    )
    statuses = {name: answer.status_code for name, answer in answers.items()}
    assert statuses == {"ok": 200, "no key": 401, "limited": 200, "refused": 429}
    for answer in answers.values():
        assert answer.headers["access-control-allow-origin"] == UI
        assert names(answer.headers["access-control-expose-headers"]) == EXPOSED
        assert "origin" in names(answer.headers["vary"])
    assert "retry-after" in answers["refused"].headers
    assert answers["ok"].headers["x-cache"] == "MISS"


def test_answers_to_another_origin_carry_no_permission(gateway: GatewayThread) -> None:
    answer = httpx.get(f"{gateway.url}/mj/task/list", headers={"Origin": OTHER, **caller()})
    assert answer.status_code == 200  # the gateway answers; the browser will not show it
    assert "access-control-allow-origin" not in answer.headers  # the one that would permit
    assert "origin" in names(answer.headers["vary"])  # a cache must not serve it to the UI


def test_every_origin_when_configured_so(sims: list[SimProcess]) -> None:
    config = make_config(sims, server={"cors": {"allow_origins": ["*"]}})
    with running_gateway(config) as gateway:
        answer = preflight(gateway, "/mj/submit/imagine", OTHER)
        assert answer.status_code == 200
        assert answer.headers["access-control-allow-origin"] == "*"
        simple = httpx.get(f"{gateway.url}/mj/task/list", headers={"Origin": OTHER, **caller()})
        assert simple.headers["access-control-allow-origin"] == "*"
        assert names(simple.headers["access-control-expose-headers"]) == EXPOSED


def test_without_allowed_origins_there_is_no_cors(sims: list[SimProcess]) -> None:
    """The default: a preflight is just an OPTIONS without a key, and no answer grants an
    origin anything."""
    with running_gateway(make_config(sims)) as gateway:
        answer = preflight(gateway, "/mj/submit/imagine", UI)
        assert answer.status_code == 401
        simple = httpx.get(f"{gateway.url}/mj/task/list", headers={"Origin": UI, **caller()})
        assert simple.status_code == 200
        for response in (answer, simple):
            assert not [h for h in response.headers if h.startswith("access-control-")]
