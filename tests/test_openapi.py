"""The OpenAPI 3.1 document at ``/openapi.json``: valid, the route table's own, and true of
the running gateway, checked by schemathesis against a real gateway process on a real port
with real sims and Redis.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from openapi_spec_validator import OpenAPIV31SpecValidator
from schemathesis import GenerationMode
from starlette.responses import Response
from starlette.routing import Route

from gateway.configfile import config_from_dict
from gateway.openapi import SUBMIT_FIELDS, document
from gateway.routes import route_table
from tests.gunicorn_support import GatewayProcess, gateway_process
from tests.load import is_error_envelope
from tests.support import RedisProcess, SimProcess, config_data, standard_sims

pytestmark = pytest.mark.timeout(120)

ADMIN_KEY = "ops-admin-key-5c1e9a7f3b"
METRICS_TOKEN = "metrics-token-8d2f6b0e4a"
PASSTHROUGH = ["/mj/account/list", "/mj-fast/mj/account/list"]
# Routes whose answers (errors included) may be an upstream's own, forwarded as they came.
FORWARDING = ("/submit/", "/insight-face/", "/account/", "/task/{task_id}/{action}")


def gateway_config(sims: list[SimProcess], redis_url: str) -> dict[str, Any]:
    """Upstreams that answer errors in the envelope's shape (csharp, relay), an admin
    client, passthrough paths and a metrics token: every route and every branch of the
    document is in play."""
    enveloped = [sim for sim in sims if sim.flavor in ("csharp", "relay")]
    data = config_data(enveloped, redis_url)
    data["clients"].append({"name": "ops", "key": ADMIN_KEY, "admin": True})
    data["passthrough"] = PASSTHROUGH
    data["metrics"] = {"token": METRICS_TOKEN}
    data["server"] = {"secret_key": "openapi-test-secret-key-3e8a1f5c7b9d"}
    data["logging"] = {"level": "warning", "format": "json"}
    return data


@pytest.fixture(scope="module")
def config_dict(session_sims: list[SimProcess], redis_server: RedisProcess) -> dict[str, Any]:
    return gateway_config(session_sims, redis_server.url)


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory, config_dict: dict[str, Any]
) -> Iterator[GatewayProcess]:
    with gateway_process(tmp_path_factory.mktemp("openapi"), config_dict) as process:
        yield process


@pytest.fixture(scope="module")
def served(gateway: GatewayProcess) -> dict[str, Any]:
    response = httpx.get(f"{gateway.url}/openapi.json")
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    result: dict[str, Any] = response.json()
    return result


def test_the_served_document_is_valid_openapi_3_1(served: dict[str, Any]) -> None:
    assert served["openapi"] == "3.1.0"
    OpenAPIV31SpecValidator(served).validate()
    operation_ids = [
        op["operationId"]
        for item in served["paths"].values()
        for key, op in item.items()
        if key != "parameters"
    ]
    assert len(operation_ids) == len(set(operation_ids))


def test_the_validator_refuses_a_broken_document(served: dict[str, Any]) -> None:
    broken = {**served, "paths": {"/x/{id}": {"get": {"responses": {"200": {}}}}}}
    assert list(OpenAPIV31SpecValidator(broken).iter_errors())


def documented(doc: dict[str, Any]) -> dict[str, set[str]]:
    return {
        path: {method.upper() for method in item if method != "parameters"}
        for path, item in doc["paths"].items()
    }


def test_the_document_states_the_route_table(
    served: dict[str, Any], config_dict: dict[str, Any]
) -> None:
    config = config_from_dict(config_dict, env={})
    routes = {
        route.path: (route.methods or set()) - {"HEAD"}
        for route in route_table(config)
        if isinstance(route, Route)
    }
    assert documented(served) == routes
    assert set(PASSTHROUGH) | {"/metrics", "/openapi.json", "/mj-turbo/mj/task/query"} <= set(
        routes
    )


def test_a_route_without_a_description_stops_start_up(config_dict: dict[str, Any]) -> None:
    async def endpoint(request: Any) -> Response:
        return Response()

    config = config_from_dict(config_dict, env={})
    with pytest.raises(ValueError, match="no OpenAPI description for GET /mj/task/new"):
        document([Route("/mj/task/new", endpoint)], config)


def concrete(path: str) -> str:
    return (
        path.replace("{task_id}", "1716000000000123")
        .replace("{kind}", "imagine")
        .replace("{action}", "image-seed")
    )


def test_every_documented_operation_is_served(
    gateway: GatewayProcess, served: dict[str, Any]
) -> None:
    """Without a key, a route behind one answers 401 and a public one 200 (the metrics
    route, behind its token, 401): never the 404 or 405 of a route that is not there."""
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for path, methods in documented(served).items():
            for method in methods:
                response = client.request(method, concrete(path))
                public = served["paths"][path][method.lower()].get("security") == []
                expected = 401 if not public or path == "/metrics" else 200
                assert response.status_code == expected, (method, path, response.text)
                if expected == 401:
                    assert is_error_envelope(response.json(), response.headers["x-request-id"])


def test_the_submit_fields_are_the_ones_the_gateway_checks(gateway: GatewayProcess) -> None:
    """Each documented field, sent with the wrong type, is refused naming it."""
    wrong = {"string": 1, "integer": "1", "array": {}, "object": []}
    with httpx.Client(base_url=gateway.url, timeout=10) as client:
        for name, kind in SUBMIT_FIELDS.items():
            headers = {"Authorization": f"Bearer {ADMIN_KEY}"}
            response = client.post("/mj/submit/imagine", json={name: wrong[kind]}, headers=headers)
            assert response.status_code == 400, (name, response.text)
            assert f"'{name}'" in response.json()["description"]


# -- schemathesis ----------------------------------------------------------------------------


def static_operations() -> list[tuple[str, str]]:
    """(method, path) of the operations to fuzz, from the document of a config like the
    module's (only the upstreams' addresses differ; the document does not depend on them).

    Of the speed modes, the plain one and ``/mj-fast``: the others are the same routes. Not
    ``insight-face``: the sims serve no such route, so every request that passes the
    gateway's checks is an upstream's bare 404, answered 502 by design (the fuzz battery
    covers what the gateway refuses there).
    """
    config = config_from_dict(gateway_config(standard_sims(), ""), env={})
    paths = documented(document(route_table(config), config))
    return sorted(
        (method, path)
        for path, methods in paths.items()
        for method in methods
        if not path.startswith(("/mj-relax/", "/mj-turbo/")) and "/insight-face/" not in path
    )


@pytest.fixture(scope="module")
def api_schema(gateway: GatewayProcess) -> Any:
    return schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")


@schemathesis.check
def gateway_errors_are_envelopes(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every error the gateway answers itself is ``{code, description, result, request_id}``
    (on the forwarding routes an upstream's own 4xx may come back as it was)."""
    if response.status_code < 400:
        return None
    forwarding = any(part in case.operation.path for part in FORWARDING)
    if forwarding and response.status_code < 500:
        return None
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        body = None
    request_id = (response.headers.get("x-request-id") or [None])[0]
    assert is_error_envelope(body, request_id), f"not the envelope: {response.content[:300]!r}"
    return True


@pytest.mark.parametrize(("method", "path"), static_operations())
def test_schemathesis_finds_no_server_error_and_no_bare_error(
    api_schema: Any, method: str, path: str
) -> None:
    """Valid and invalid requests generated from the document, the built-in checks (no 5xx;
    status, content type and body as documented) and the envelope check.

    Submits go to a kind the sims serve: an upstream's bare 404 for an unknown kind is
    answered 502 by design. Authentication is checked by
    ``test_every_documented_operation_is_served``: schemathesis's own auth check would send
    a made-up ``mj-api-secret`` beside the valid ``Authorization``, which wins by design. A
    query's page depth is a rule across two fields that a schema cannot state (it is in the
    description), and an ``Idempotency-Key`` reused with another body (422) is a rule across
    two requests: there a valid-looking request may be refused.
    """
    operation = api_schema[path][method]
    fixed = {"kind": "imagine"} if "{kind}" in path else None
    cases = operation.as_strategy(
        GenerationMode.POSITIVE, path_parameters=fixed
    ) | operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=fixed)
    excluded = [schemathesis.checks.ignored_auth]
    if path.endswith("/task/query") or "{kind}" in path:
        excluded.append(schemathesis.checks.positive_data_acceptance)

    @given(case=cases)
    @settings(max_examples=6, deadline=None, suppress_health_check=list(HealthCheck))
    def check(case: Any) -> None:
        case.call_and_validate(
            headers={"Authorization": f"Bearer {ADMIN_KEY}"},
            additional_checks=[gateway_errors_are_envelopes],
            excluded_checks=excluded,
            timeout=15,
        )

    check()
