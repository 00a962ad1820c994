"""Checking what callers send: field types, parent tasks, ids and body limits, all refused
before any upstream sees them."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import orjson
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.testclient import TestClient

from gateway.errors import GatewayError
from gateway.validation import (
    check_submit_fields,
    parent_task_id,
    read_ids,
    read_json_object,
    require_task_id,
)
from tests.support import GatewayThread, SimProcess, caller, make_config, running_gateway

# --- check_submit_fields --------------------------------------------------------------------


def refused(call: Any, *args: Any) -> GatewayError:
    with pytest.raises(GatewayError) as caught:
        call(*args)
    return caught.value


@pytest.mark.parametrize(
    ("field", "value", "kind"),
    [
        ("prompt", 42, "a string"),
        ("prompt", ["a cat"], "a string"),
        ("prompt", True, "a string"),
        ("taskId", 1730000000000123, "a string"),
        ("customId", {"x": 1}, "a string"),
        ("index", "1", "an integer"),
        ("index", 1.5, "an integer"),
        ("index", True, "an integer"),
        ("base64Array", "data:image/png;base64,AAAA", "an array"),
        ("accountFilter", ["a"], "an object"),
        ("notifyHook", 5, "a string"),
    ],
)
def test_wrong_type_names_the_field(field: str, value: Any, kind: str) -> None:
    error = refused(check_submit_fields, {"prompt": "ok", field: value})
    assert error.status == 400
    assert error.description == f"field '{field}' must be {kind}"


def test_right_types_pass() -> None:
    check_submit_fields(
        {
            "prompt": "a cat",
            "taskId": "1730000000000123",
            "customId": "MJ::JOB::upsample::1::x",
            "index": 1,
            "base64Array": ["data:image/png;base64,AAAA"],
            "accountFilter": {"channelId": "1"},
            "state": "",
        }
    )


def test_null_and_unknown_fields_pass() -> None:
    check_submit_fields({"prompt": None, "index": None, "botType": None})
    check_submit_fields({"prompt": "x", "someUpstreamExtra": [1, {"a": 2}], "mode": 5})


# --- parent_task_id ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["action", "modal", "change"])
def test_follow_ups_need_a_task_id(kind: str) -> None:
    error = refused(parent_task_id, kind, {"customId": "MJ::JOB::upsample::1::x"})
    assert error.status == 400
    assert "taskId" in error.description


@pytest.mark.parametrize("kind", ["action", "modal", "change", "imagine", "blend", "describe"])
def test_any_body_with_a_task_id_names_its_parent(kind: str) -> None:
    assert parent_task_id(kind, {"taskId": "1730000000000123"}) == "1730000000000123"


@pytest.mark.parametrize("kind", ["imagine", "blend", "describe", "shorten"])
def test_new_work_has_no_parent(kind: str) -> None:
    assert parent_task_id(kind, {"prompt": "a cat"}) is None


@pytest.mark.parametrize("task_id", ["", "a/b", "a" * 65, "täsk", 17300, None])
def test_bad_task_id_is_refused(task_id: Any) -> None:
    error = refused(parent_task_id, "action", {"taskId": task_id})
    assert error.status == 400
    assert "taskId" in error.description


@pytest.mark.parametrize(
    ("content", "parent"),
    [
        ("1730000000000123 U2", "1730000000000123"),
        ("1730000000000123 V1", "1730000000000123"),
        ("  1730000000000123   R  ", "1730000000000123"),
        ("abc_DEF-9 low_variation", "abc_DEF-9"),
    ],
)
def test_simple_change_takes_its_parent_from_content(content: str, parent: str) -> None:
    assert parent_task_id("simple-change", {"content": content}) == parent


@pytest.mark.parametrize("body", [{}, {"content": ""}, {"content": "   "}, {"content": 17300}])
def test_simple_change_needs_content(body: dict[str, Any]) -> None:
    error = refused(parent_task_id, "simple-change", body)
    assert error.status == 400
    assert "content" in error.description


@pytest.mark.parametrize("content", ["../../x U1", "a/b U2", "täsk U1", "x" * 65 + " U1"])
def test_simple_change_with_a_bad_task_id_in_content(content: str) -> None:
    error = refused(parent_task_id, "simple-change", {"content": content})
    assert error.status == 400
    assert "content" in error.description


def test_simple_change_ignores_a_task_id_field() -> None:
    body = {"content": "1730000000000123 U1", "taskId": "999"}
    assert parent_task_id("simple-change", body) == "1730000000000123"


def test_require_task_id_names_the_field() -> None:
    assert require_task_id("abc") == "abc"
    error = refused(require_task_id, "a b", "field 'x'")
    assert error.status == 400
    assert error.description.startswith("field 'x' must be")


# --- reading bodies: a tiny app around the real functions -----------------------------------

LIMIT = 200
MAX_IDS = 3


async def ids_endpoint(request: Request) -> Response:
    return JSONResponse(await read_ids(request, LIMIT, MAX_IDS))


async def object_endpoint(request: Request) -> Response:
    optional = request.query_params.get("optional") == "1"
    return JSONResponse({"data": await read_json_object(request, LIMIT, optional=optional)})


async def gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return JSONResponse({"description": exc.description}, status_code=exc.status)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    app = Starlette(
        routes=[
            Route("/ids", ids_endpoint, methods=["POST"]),
            Route("/object", object_endpoint, methods=["POST"]),
        ],
        exception_handlers={GatewayError: gateway_error},
    )
    with TestClient(app) as test_client:
        yield test_client


def test_read_ids(client: TestClient) -> None:
    response = client.post("/ids", json={"ids": ["3", "1", "2"]})
    assert response.status_code == 200
    assert response.json() == ["3", "1", "2"]


def test_read_ids_accepts_exactly_max_ids_and_no_more(client: TestClient) -> None:
    assert client.post("/ids", json={"ids": ["1", "2", "3"]}).status_code == 200
    response = client.post("/ids", json={"ids": ["1", "2", "3", "4"]})
    assert response.status_code == 400
    assert response.json()["description"] == "too many ids: 4 given, at most 3 allowed"


def test_read_ids_of_an_empty_list(client: TestClient) -> None:
    response = client.post("/ids", json={"ids": []})
    assert response.status_code == 200
    assert response.json() == []


@pytest.mark.parametrize(
    "body", [{}, {"ids": "1"}, {"ids": None}, {"ids": {"1": True}}, {"taskIds": ["1"]}]
)
def test_read_ids_needs_an_ids_array(client: TestClient, body: dict[str, Any]) -> None:
    response = client.post("/ids", json=body)
    assert response.status_code == 400
    assert "'ids'" in response.json()["description"]


@pytest.mark.parametrize(
    ("ids", "index"), [(["1", "a/b"], 1), ([5], 0), (["1", "2", ""], 2), (["x" * 65], 0)]
)
def test_read_ids_names_the_bad_id(client: TestClient, ids: list[Any], index: int) -> None:
    response = client.post("/ids", json={"ids": ids})
    assert response.status_code == 400
    assert response.json()["description"].startswith(f"ids[{index}] must be a task id")


@pytest.mark.parametrize(
    ("content", "description"),
    [
        (b"", "request body is empty; expected a JSON object"),
        (b"  \n", "request body is empty; expected a JSON object"),
        (b"{not json", "request body is not valid JSON"),
        (b'["1", "2"]', "request body must be a JSON object"),
        (b"null", "request body must be a JSON object"),
        (b'"ids"', "request body must be a JSON object"),
    ],
)
def test_read_json_object_refuses_what_is_not_an_object(
    client: TestClient, content: bytes, description: str
) -> None:
    response = client.post("/object", content=content)
    assert response.status_code == 400
    assert response.json()["description"] == description


def test_read_json_object_optional_allows_an_empty_body(client: TestClient) -> None:
    response = client.post("/object?optional=1", content=b"")
    assert response.status_code == 200
    assert response.json() == {"data": None}
    assert client.post("/object?optional=1", json={"a": 1}).json() == {"data": {"a": 1}}


def test_body_at_the_limit_is_read(client: TestClient) -> None:
    body = orjson.dumps({"pad": "x" * (LIMIT - 10)})
    assert len(body) == LIMIT
    assert client.post("/object", content=body).status_code == 200


def test_body_over_the_limit_is_413(client: TestClient) -> None:
    body = orjson.dumps({"pad": "x" * (LIMIT - 9)})
    assert len(body) == LIMIT + 1
    response = client.post("/object", content=body)
    assert response.status_code == 413
    assert str(LIMIT) in response.json()["description"]


def test_streamed_body_over_the_limit_is_413_without_content_length(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"pad": "'
        for _ in range(10):
            yield b"x" * 50
        yield b'"}'

    response = client.post("/object", content=chunks())
    assert response.status_code == 413


@pytest.mark.parametrize("declared", ["999999", "abc", "-1"])
def test_declared_length_over_the_limit_or_ill_formed_is_413(
    client: TestClient, declared: str
) -> None:
    response = client.post("/object", content=b"{}", headers={"content-length": declared})
    assert response.status_code == 413


# --- through the running gateway: refused before any upstream call ---------------------------


@pytest.fixture(scope="module")
def http() -> Iterator[httpx.Client]:
    with httpx.Client(timeout=10, headers=caller("alice")) as client:
        yield client


@pytest.fixture(scope="module")
def gateway(session_sims: list[SimProcess]) -> Iterator[GatewayThread]:
    for sim in session_sims:
        sim.reset()  # no faults left over from other modules
    config = make_config(session_sims, fanout={"max_ids": 5}, server={"max_body_bytes": 4096})
    with running_gateway(config) as running:
        yield running


def upstream_total(http: httpx.Client, sims: list[SimProcess]) -> int:
    return sum(int(http.get(f"{sim.url}/_sim/stats").json()["total"]) for sim in sims)


@pytest.mark.parametrize(
    ("path", "body", "status", "needle"),
    [
        ("/mj/submit/imagine", {"prompt": 7}, 400, "field 'prompt' must be a string"),
        ("/mj/submit/action", {"customId": "MJ::x", "index": "1"}, 400, "field 'index'"),
        ("/mj/submit/action", {"customId": "MJ::JOB::upsample::1::x"}, 400, "taskId"),
        ("/mj/submit/modal", {"taskId": "a/b"}, 400, "taskId"),
        ("/mj/submit/simple-change", {"content": ""}, 400, "content"),
        ("/mj/submit/simple-change", {"content": "../x U1"}, 400, "content"),
        ("/mj-fast/mj/submit/imagine", {"prompt": ["x"]}, 400, "field 'prompt'"),
        ("/mj/task/list-by-ids", {"ids": [str(n) for n in range(6)]}, 400, "too many ids"),
        ("/mj/task/list-by-condition", {"ids": ["1", "a b"]}, 400, "ids[1]"),
        ("/mj/task/list-by-condition", {"id": ["1"]}, 400, "'ids'"),
        ("/mj/submit/imagine", {"prompt": "x" * 5000}, 413, "larger than the limit"),
    ],
)
def test_bad_input_is_refused_with_json_and_no_upstream_call(
    http: httpx.Client,
    gateway: GatewayThread,
    session_sims: list[SimProcess],
    path: str,
    body: dict[str, Any],
    status: int,
    needle: str,
) -> None:
    before = upstream_total(http, session_sims)
    response = http.post(f"{gateway.url}{path}", json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert set(answer) == {"code", "description", "result", "request_id"}
    assert answer["code"] == 4
    assert answer["result"] is None  # bots read rj["result"] on every answer
    assert needle in answer["description"]
    assert answer["request_id"] == response.headers["x-request-id"]
    assert upstream_total(http, session_sims) == before


@pytest.mark.parametrize("content", [b"", b"{oops", b"[1, 2]"])
def test_non_json_submit_is_refused(
    http: httpx.Client, gateway: GatewayThread, session_sims: list[SimProcess], content: bytes
) -> None:
    before = upstream_total(http, session_sims)
    response = http.post(
        f"{gateway.url}/mj/submit/imagine",
        content=content,
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400
    assert response.json()["code"] == 4
    assert upstream_total(http, session_sims) == before


def test_max_ids_is_allowed(
    http: httpx.Client, gateway: GatewayThread, session_sims: list[SimProcess]
) -> None:
    response = http.post(
        f"{gateway.url}/mj/task/list-by-ids", json={"ids": [f"v{n}" for n in range(5)]}
    )
    assert response.status_code == 200, response.text
    assert response.json() == []
