"""Visibility: ``own`` sees only its own tasks, ``team`` its team's, ``all`` every task, and
an admin every task whatever it says; on every route that names or lists tasks, a task a
caller may not see is answered exactly like an unknown id.

Each test below is one route: alice, bob and carol each submit a task through the gateway,
a fourth task is made on the sim directly (never through mjgate), and every caller tries
every task. The route table is checked against the cases, so a new task route without a case
(and so without a check) fails here. Real sim, real app, the embedded store and Redis.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from starlette.routing import Route

from gateway.configfile import config_from_dict
from gateway.routes import route_table
from tests.ledger_support import as_caller, config_dict, faults, submit
from tests.sims_extra import fresh, unique_id, wait_for_status
from tests.support import GatewayThread, SimProcess, running_gateway

OWNERS = ("alice", "bob", "carol", "outside")
SEES = {
    "alice": {"alice"},
    "bob": {"alice", "bob"},
    "carol": set(OWNERS),
    "ops": set(OWNERS),
}


@dataclass(frozen=True)
class Case:
    """One way of naming a task to the gateway: ``probe(http, task_id, unknown_id)`` says
    whether the caller saw the task, and checks that a task it did not see was answered like
    the unknown id. ``needs``: the tasks it takes (done, running or modal ones, shared by the
    cases that leave them as they are; cancel gets running tasks of its own)."""

    route: tuple[str, str]
    needs: str
    probe: Callable[[httpx.Client, str, str], bool]


def _like_unknown(
    answer: httpx.Response, unknown: httpx.Response, task_id: str, other: str
) -> None:
    assert answer.status_code == unknown.status_code == 404, (answer.text, unknown.text)
    for header in ("content-type", "x-cache", "x-cache-tier"):
        assert answer.headers.get(header) == unknown.headers.get(header), header
    body, expected = answer.json(), unknown.json()
    assert body.pop("request_id") != expected.pop("request_id")
    assert body == {**expected, "description": expected["description"].replace(other, task_id)}


def _single(method: str, path: str, body: Callable[[str], Any] | None = None) -> Any:
    """A probe of a route about one task (``{id}`` in the path or the body)."""

    def probe(http: httpx.Client, task_id: str, unknown_id: str) -> bool:
        def ask(which: str) -> httpx.Response:
            payload = body(which) if body is not None else None
            return http.request(method, path.format(id=which), json=payload)

        answer = ask(task_id)
        if answer.status_code != 404:
            assert answer.status_code == 200, answer.text
            return True
        _like_unknown(answer, ask(unknown_id), task_id, unknown_id)
        return False

    return probe


def _listed(
    method: str, path: str, body: Callable[[str], Any] | None = None, alone: bool = False
) -> Any:
    """A probe of a route answering a list (or a page) of tasks; ``alone``: the request names
    only this task, so not seeing it must look like asking for an unknown id."""

    def probe(http: httpx.Client, task_id: str, unknown_id: str) -> bool:
        def ask(which: str) -> Any:
            response = http.request(method, path, json=body(which) if body else None)
            assert response.status_code == 200, response.text
            return response.json()

        rows = ask(task_id)
        page = isinstance(rows, dict)
        ids = [row["id"] for row in (rows["content"] if page else rows)]
        if alone and task_id not in ids:
            assert rows == ask(unknown_id)  # the same empty answer, no count of hidden tasks
        return task_id in ids

    return probe


CASES: dict[str, Case] = {
    "fetch": Case(
        ("GET", "/mj/task/{task_id}/fetch"), "done", _single("GET", "/mj/task/{id}/fetch")
    ),
    "fetch-fast": Case(
        ("GET", "/mj/task/{task_id}/fetch"), "done", _single("GET", "/mj-fast/mj/task/{id}/fetch")
    ),
    "list-by-ids": Case(
        ("POST", "/mj/task/list-by-ids"),
        "done",
        _listed("POST", "/mj/task/list-by-ids", lambda t: {"ids": [t]}, alone=True),
    ),
    "list-by-condition": Case(
        ("POST", "/mj/task/list-by-condition"),
        "done",
        _listed("POST", "/mj/task/list-by-condition", lambda t: {"ids": [t]}, alone=True),
    ),
    "query-by-id": Case(
        ("POST", "/mj/task/query"),
        "done",
        _listed("POST", "/mj/task/query", lambda t: {"ids": [t], "pageSize": 10}, alone=True),
    ),
    "query": Case(
        ("POST", "/mj/task/query"),
        "done",
        _listed("POST", "/mj/task/query", lambda t: {"pageSize": 100}),
    ),
    "list": Case(("GET", "/mj/task/list"), "done", _listed("GET", "/mj/task/list")),
    "queue": Case(("GET", "/mj/task/queue"), "running", _listed("GET", "/mj/task/queue")),
    "image-seed": Case(
        ("GET", "/mj/task/{task_id}/{action}"), "done", _single("GET", "/mj/task/{id}/image-seed")
    ),
    "cancel": Case(
        ("POST", "/mj/task/{task_id}/{action}"),
        "to-cancel",
        _single("POST", "/mj/task/{id}/cancel"),
    ),
    "action": Case(
        ("POST", "/mj/submit/{kind}"),
        "done",
        _single(
            "POST",
            "/mj/submit/action",
            lambda t: {"taskId": t, "customId": f"MJ::JOB::upsample::1::{t}"},
        ),
    ),
    "change": Case(
        ("POST", "/mj/submit/{kind}"),
        "done",
        _single(
            "POST", "/mj/submit/change", lambda t: {"taskId": t, "action": "UPSCALE", "index": 1}
        ),
    ),
    "simple-change": Case(
        ("POST", "/mj/submit/{kind}"),
        "done",
        _single("POST", "/mj/submit/simple-change", lambda t: {"content": f"{t} U1"}),
    ),
    "events": Case(
        ("GET", "/mj/task/{task_id}/events"), "done", _single("GET", "/mj/task/{id}/events")
    ),
    "events-token": Case(
        ("POST", "/mj/task/{task_id}/events/token"),
        "done",
        _single("POST", "/mj/task/{id}/events/token"),
    ),
    "modal": Case(
        ("POST", "/mj/submit/{kind}"),
        "modal",
        _single("POST", "/mj/submit/modal", lambda t: {"taskId": t, "prompt": "zoomed"}),
    ),
}
# Routes that name no task: nothing there to hide.
NAMES_NO_TASK = {("POST", "/mj/insight-face/{kind}")}


@pytest.fixture(scope="module", params=["memory", "redis"])
def gateway(
    request: pytest.FixtureRequest, session_sims: list[SimProcess]
) -> Iterator[GatewayThread]:
    java = session_sims[0]
    url = request.getfixturevalue("redis_server").url if request.param == "redis" else ""
    data = config_dict(
        [java],
        url,
        upstreams=[java.upstream_config(supports_query=True)],
        server={"secret_key": "visibility-test-signing-key-0123456789"},
    )
    with running_gateway(config_from_dict(data, env={})) as gw:
        yield gw


@pytest.fixture(scope="module")
def tasks(
    gateway: GatewayThread, session_sims: list[SimProcess]
) -> Callable[[str], dict[str, str]]:
    """The tasks a case needs, made once per gateway (the sim is not reset in between)."""
    sim = fresh(session_sims[:1])[0]
    made: dict[str, dict[str, str]] = {}

    def get(needs: str) -> dict[str, str]:
        if needs not in made:
            made[needs] = make_tasks(gateway, sim, needs)
        return made[needs]

    return get


def make_tasks(gateway: GatewayThread, sim: SimProcess, needs: str) -> dict[str, str]:
    """One task per owner, in the state the route needs; "outside" is made on the sim."""
    running = needs in ("running", "to-cancel")
    seconds = 60.0 if running else 0.2
    tasks: dict[str, str] = {}
    with faults(sim, task_seconds=seconds, failure_rate=0):
        for owner in OWNERS[:3]:
            with as_caller(gateway, owner) as http:
                tasks[owner] = submit(http, f"visibility {owner} {unique_id()}")
        outside = unique_id()
        if running:
            sim.seed(id=outside, playing=True, task_seconds=60, outcome="SUCCESS")
        else:
            sim.seed(id=outside, prompt="made outside mjgate")
        tasks["outside"] = outside
    if running:
        return tasks
    for owner in OWNERS[:3]:
        wait_for_status(sim, tasks[owner], "SUCCESS")
    if needs == "modal":
        return {owner: _modal(gateway, sim, owner, parent) for owner, parent in tasks.items()}
    return tasks


def _modal(gateway: GatewayThread, sim: SimProcess, owner: str, parent: str) -> str:
    """A MODAL task (a custom zoom waiting for its prompt) made by ``owner``."""
    if owner == "outside":
        modal = unique_id()
        sim.seed(id=modal, status="MODAL", action="ZOOM")
        return modal
    with as_caller(gateway, owner) as http:
        body = {"taskId": parent, "customId": f"MJ::CustomZoom::{parent}"}
        return submit(http, path="/mj/submit/action", **body)


@pytest.mark.parametrize("name", list(CASES))
def test_each_caller_sees_exactly_the_tasks_its_visibility_allows(
    gateway: GatewayThread, tasks: Callable[[str], dict[str, str]], name: str
) -> None:
    case = CASES[name]
    made = tasks(case.needs)
    seen: dict[str, set[str]] = {}
    for caller in SEES:
        with as_caller(gateway, caller) as http:
            seen[caller] = {
                owner for owner, task_id in made.items() if case.probe(http, task_id, unique_id())
            }
    assert seen == SEES


def test_every_route_that_names_or_lists_tasks_has_a_case() -> None:
    java = SimProcess("java", "java", "k", "mj-api-secret", "/mj/task/list-by-condition")
    config = config_from_dict(config_dict([java]), env={})
    task_routes = {
        (method, route.path)
        for route in route_table(config)
        if isinstance(route, Route) and route.path.startswith("/mj/")
        for method in route.methods or ()
        if method != "HEAD"
    }
    assert task_routes == {case.route for case in CASES.values()} | NAMES_NO_TASK
