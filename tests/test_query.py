"""Paged search and the recent/queued lists (``gateway/query.py``): ``parse_query`` and
``page_object`` as units, then ``/mj/task/query``, ``/mj/task/list`` and ``/mj/task/queue``
across real sims, checked against a reference computed from every sim's full data."""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.config import Config
from gateway.errors import GatewayError
from gateway.query import MAX_DEPTH, QuerySpec, page_object, parse_query
from tests.support import (
    GatewayThread,
    SimProcess,
    caller,
    make_config,
    running_gateway,
)

STATUSES = ("NOT_START", "SUBMITTED", "MODAL", "IN_PROGRESS", "FAILURE", "SUCCESS", "CANCEL")
TERMINAL = frozenset({"SUCCESS", "FAILURE", "CANCEL"})
ACTIONS = ("IMAGINE", "UPSCALE", "VARIATION", "DESCRIBE", "BLEND")
PROMPTS = (
    "a red fox in the snow",
    "Red panda eating bamboo",
    "city at night, neon",
    "a blue whale",
    "FOX and hound",
    "night market",
    "",
)
PROMPT_PARTS = ("fox", "RED", "night", "a ", "whale", "zebra")
SORT_FIELDS = (
    "id",
    "action",
    "status",
    "progress",
    "prompt",
    "promptEn",
    "description",
    "state",
    "submitTime",
    "startTime",
    "finishTime",
    "failReason",
)
PAGE_KEYS = {
    "content",
    "totalElements",
    "totalPages",
    "number",
    "size",
    "numberOfElements",
    "first",
    "last",
    "empty",
    "pageable",
    "sort",
}
QUERY = "POST /mj/task/query"
LIST_BY_IDS = "POST /mj/task/list-by-ids"
UNKNOWN_ID = "1699999999999000"
NO_LIMITS = {"default": {"rps": 100_000, "burst": 100_000}}


# -- units: parse_query ------------------------------------------------------------------------


def rejected(body: dict[str, Any]) -> str:
    with pytest.raises(GatewayError) as caught:
        parse_query(body)
    assert caught.value.status == 400
    return caught.value.description


def test_parse_query_defaults() -> None:
    spec = parse_query({})
    assert (spec.page, spec.size, spec.order, spec.filters) == (0, 10, ("submitTime", True), {})


def test_parse_query_reads_paging_sort_and_filters() -> None:
    spec = parse_query(
        {
            "pageNumber": 2,
            "pageSize": 25,
            "sort": " finishTime , ASC ",
            "status": "SUCCESS",
            "statusSet": ["SUCCESS", "FAILURE"],
            "action": "IMAGINE",
            "prompt": "fox",
            "description": "",
            "state": None,
            "ids": ["1700000000000001", "1700000000000002"],
            "id": "1700000000000003",
            "unknownField": {"ignored": True},
        }
    )
    assert (spec.page, spec.size, spec.order) == (2, 25, ("finishTime", False))
    assert spec.filters == {
        "status": "SUCCESS",
        "statusSet": ["SUCCESS", "FAILURE"],
        "action": "IMAGINE",
        "prompt": "fox",
        "ids": ["1700000000000001", "1700000000000002"],
        "id": "1700000000000003",
    }
    assert spec.ids == ["1700000000000001", "1700000000000002", "1700000000000003"]


@pytest.mark.parametrize(
    ("sort", "order"),
    [("id", ("id", False)), ("id,desc", ("id", True)), ("", ("submitTime", True))],
)
def test_parse_query_sort_direction_defaults_to_ascending(
    sort: str, order: tuple[str, bool]
) -> None:
    assert parse_query({"sort": sort}).order == order


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"pageNumber": "1"}, "field 'pageNumber' must be an integer >= 0"),
        ({"pageNumber": -1}, "field 'pageNumber' must be an integer >= 0"),
        ({"pageNumber": 1.5}, "field 'pageNumber' must be an integer >= 0"),
        ({"pageNumber": True}, "field 'pageNumber' must be an integer >= 0"),
        ({"pageSize": 0}, "field 'pageSize' must be an integer >= 1"),
        ({"pageSize": "10"}, "field 'pageSize' must be an integer >= 1"),
        ({"pageSize": [10]}, "field 'pageSize' must be an integer >= 1"),
        ({"status": 1}, "field 'status' must be a string"),
        ({"prompt": ["fox"]}, "field 'prompt' must be a string"),
        ({"action": {"eq": "IMAGINE"}}, "field 'action' must be a string"),
        ({"id": "not an id!"}, "field 'id' must be a task id"),
        ({"ids": "1700000000000001"}, "field 'ids' must be an array of task ids"),
        ({"ids": ["1700000000000001", "../etc"]}, "field 'ids' must be an array of task ids"),
        ({"ids": [1700000000000001]}, "field 'ids' must be an array of task ids"),
        ({"statusSet": "SUCCESS"}, "field 'statusSet' must be an array of statuses"),
        ({"statusSet": ["SUCCESS", "DONE"]}, "field 'statusSet' must be an array of statuses"),
    ],
)
def test_parse_query_rejects_wrong_types_with_a_message_naming_the_field(
    body: dict[str, Any], message: str
) -> None:
    assert rejected(body) == message


def test_parse_query_rejects_an_unknown_status_listing_the_valid_ones() -> None:
    message = rejected({"status": "DONE"})
    assert message.startswith("field 'status' must be one of ")
    assert all(status in message for status in STATUSES)


@pytest.mark.parametrize("sort", ["bogus,asc", "id,up", "id,desc,extra", 5, ["id,asc"], "imageUrl"])
def test_parse_query_rejects_a_bad_sort(sort: Any) -> None:
    message = rejected({"sort": sort})
    assert message.startswith("field 'sort' must be 'FIELD,asc' or 'FIELD,desc'")
    assert "submitTime" in message and "finishTime" in message


def test_parse_query_rejects_pages_deeper_than_the_limit() -> None:
    assert parse_query({"pageNumber": 99, "pageSize": MAX_DEPTH // 100}).page == 99
    message = rejected({"pageNumber": 100, "pageSize": MAX_DEPTH // 100})
    assert message == f"page too deep: (pageNumber + 1) * pageSize must be <= {MAX_DEPTH}"
    assert "page too deep" in rejected({"pageSize": MAX_DEPTH + 1})


# -- units: page_object ------------------------------------------------------------------------


def rows(n: int) -> list[dict[str, Any]]:
    return [{"id": str(1700000000000000 + i)} for i in range(n)]


def spec(page: int, size: int) -> QuerySpec:
    return QuerySpec(page=page, size=size, order=("submitTime", True), filters={})


def test_page_object_middle_page() -> None:
    page = page_object(rows(25), 25, spec(1, 10))
    assert set(page) == PAGE_KEYS
    assert page["content"] == rows(25)[10:20]
    assert page["totalElements"] == 25
    assert page["totalPages"] == 3
    assert (page["number"], page["size"], page["numberOfElements"]) == (1, 10, 10)
    assert (page["first"], page["last"], page["empty"]) == (False, False, False)
    assert page["pageable"] == {
        "offset": 10,
        "pageNumber": 1,
        "pageSize": 10,
        "paged": True,
        "unpaged": False,
        "sort": {"empty": False, "sorted": True, "unsorted": False},
    }
    assert page["sort"] == {"empty": False, "sorted": True, "unsorted": False}


def test_page_object_first_and_last_pages() -> None:
    first = page_object(rows(25), 25, spec(0, 10))
    assert (first["first"], first["last"], first["pageable"]["offset"]) == (True, False, 0)
    last = page_object(rows(25), 25, spec(2, 10))
    assert last["content"] == rows(25)[20:]
    assert (last["numberOfElements"], last["first"], last["last"]) == (5, False, True)


def test_page_object_past_the_end_is_empty_and_last() -> None:
    page = page_object(rows(25), 25, spec(7, 10))
    assert page["content"] == []
    assert (page["numberOfElements"], page["empty"], page["last"], page["first"]) == (
        0,
        True,
        True,
        False,
    )
    assert page["pageable"]["offset"] == 70


def test_page_object_of_nothing() -> None:
    page = page_object([], 0, spec(0, 10))
    assert (page["totalElements"], page["totalPages"], page["numberOfElements"]) == (0, 0, 0)
    assert (page["first"], page["last"], page["empty"]) == (True, True, True)


def test_page_object_totals_come_from_the_upstream_totals_not_the_rows() -> None:
    # Upstreams are asked only for the rows up to the page; the totals are theirs.
    page = page_object(rows(20), 95, spec(1, 10))
    assert (page["totalElements"], page["totalPages"], page["last"]) == (95, 10, False)
    assert page["content"] == rows(20)[10:20]


# -- the world: three sims with known data -----------------------------------------------------


def build_tasks(rng: random.Random, ids: list[str]) -> list[dict[str, Any]]:
    """Tasks with every sort field varied, ties on purpose and some missing values."""
    base = 1_731_000_000_000
    tasks: list[dict[str, Any]] = []
    for task_id in ids:
        status = rng.choice(STATUSES)
        submit = None if rng.random() < 0.1 else base + rng.randrange(30) * 1000
        started = status not in ("NOT_START", "MODAL") and submit is not None
        start = submit + rng.randrange(1, 5) * 500 if started and submit is not None else None
        finish = start + rng.randrange(1, 60) * 1000 if status in TERMINAL and start else None
        prompt = rng.choice(PROMPTS)
        tasks.append(
            {
                "id": task_id,
                "status": status,
                "action": rng.choice(ACTIONS),
                "prompt": prompt,
                "promptEn": prompt.upper() if rng.random() < 0.5 else prompt,
                "description": rng.choice(["Submit success", "In queue", "Done"]),
                "state": rng.choice(["", "team-a", "team-b"]),
                "submitTime": submit,
                "startTime": start,
                "finishTime": finish,
                "progress": rng.choice(["0%", "25%", "50%", "100%", ""]),
                "failReason": rng.choice(["banned", "Invalid aspect ratio"])
                if status == "FAILURE"
                else "",
                "imageUrl": "",
            }
        )
    return tasks


def query_sim(name: str, flavor: str, auth: str, path: str, *extra: str) -> SimProcess:
    return SimProcess(name, flavor, f"{name}-query-key-0123", auth, path, tuple(extra))


@dataclass
class World:
    sims: dict[str, SimProcess]
    tasks: dict[str, list[dict[str, Any]]]  # by upstream, as the sims serve them
    config: Config
    gateway: GatewayThread

    @property
    def all_ids(self) -> list[str]:
        return [t["id"] for rows in self.tasks.values() for t in rows]


def world_config(sims: list[SimProcess]) -> Config:
    upstreams = [
        s.upstream_config(supports_query=s.name != "relay", max_rps=10_000, max_concurrency=128)
        for s in sims
    ]
    return make_config(sims, "", upstreams=upstreams, rate_limit=NO_LIMITS)


@pytest.fixture(scope="module")
def world() -> Iterator[World]:
    sims = [
        query_sim("java", "java", "mj-api-secret", "/mj/task/list-by-condition"),
        query_sim("csharp", "csharp", "mj-api-secret", "/mj/task/list-by-condition"),
        query_sim(
            "relay",
            "relay",
            "bearer",
            "/mj/task/list-by-ids",
            "--list-paths",
            "list-by-ids",
            "--no-query",
        ),
    ]
    rng = random.Random(20261121)
    unique = rng.sample(range(10**12), 120)
    ids = [f"1731{n:012d}" for n in unique]
    sizes = {"java": 45, "csharp": 45, "relay": 30}  # 120 in all: more than list's 100
    try:
        with ThreadPoolExecutor(len(sims)) as pool:  # each start waits for a new process
            list(pool.map(SimProcess.start, sims))
        tasks: dict[str, list[dict[str, Any]]] = {}
        with httpx.Client(timeout=10) as control:
            for sim in sims:
                mine, ids = ids[: sizes[sim.name]], ids[sizes[sim.name] :]
                for task in build_tasks(rng, mine):
                    control.post(f"{sim.url}/_sim/tasks", json=task).raise_for_status()
                # The reference is what the sim actually holds, read back through /_sim/tasks.
                tasks[sim.name] = [
                    control.get(f"{sim.url}/_sim/tasks/{task_id}").json() for task_id in mine
                ]
        config = world_config(sims)
        with running_gateway(config) as gateway:
            yield World({s.name: s for s in sims}, tasks, config, gateway)
    finally:
        for sim in sims:
            sim.stop()


# -- the reference -----------------------------------------------------------------------------


def rank(value: Any) -> tuple[int, float, str]:
    """Missing values first, then numbers, then strings (each field holds one kind)."""
    if value is None:
        return (0, 0.0, "")
    if isinstance(value, int | float):
        return (1, float(value), "")
    return (2, 0.0, str(value))


def ordered(rows: list[dict[str, Any]], field: str, descending: bool) -> list[dict[str, Any]]:
    return sorted(rows, key=lambda t: (rank(t.get(field)), t["id"]), reverse=descending)


def wanted(task: dict[str, Any], body: dict[str, Any]) -> bool:
    for name in ("status", "action", "id"):
        if body.get(name) and task.get(name) != body[name]:
            return False
    if body.get("prompt") and body["prompt"].casefold() not in str(task["prompt"]).casefold():
        return False
    if body.get("ids") and task["id"] not in body["ids"]:
        return False
    return not (body.get("statusSet") and task["status"] not in body["statusSet"])


def reference_page(world: World, body: dict[str, Any]) -> dict[str, Any]:
    """What one upstream holding every task would answer. The relay (no query of its own) is
    searched only when the filter names ids."""
    searched = world.tasks["java"] + world.tasks["csharp"]
    if body.get("ids") or body.get("id"):
        searched = searched + world.tasks["relay"]
    field, _, direction = (body.get("sort") or "submitTime,desc").partition(",")
    page, size = body.get("pageNumber", 0), body.get("pageSize", 10)
    rows = ordered([t for t in searched if wanted(t, body)], field, direction == "desc")
    content = rows[page * size : (page + 1) * size]
    pages = math.ceil(len(rows) / size)
    return {
        "content": content,
        "totalElements": len(rows),
        "totalPages": pages,
        "number": page,
        "size": size,
        "numberOfElements": len(content),
        "first": page == 0,
        "last": page >= pages - 1,
        "empty": not content,
    }


def gateway_client(world: World, name: str = "alice") -> httpx.Client:
    return httpx.Client(base_url=world.gateway.url, headers=caller(name), timeout=10)


# -- /mj/task/query across upstreams -----------------------------------------------------------


@st.composite
def query_bodies(draw: st.DrawFn, ids: list[str]) -> dict[str, Any]:
    body: dict[str, Any] = {}
    if draw(st.booleans()):
        body["pageNumber"] = draw(st.integers(0, 6))
    if draw(st.booleans()):
        body["pageSize"] = draw(st.integers(1, 30))
    if draw(st.integers(0, 5)):
        direction = draw(st.sampled_from(["asc", "desc"]))
        body["sort"] = f"{draw(st.sampled_from(SORT_FIELDS))},{direction}"
    if draw(st.integers(0, 3)) == 0:
        body["status"] = draw(st.sampled_from(STATUSES))
    if draw(st.integers(0, 3)) == 0:
        body["statusSet"] = draw(st.lists(st.sampled_from(STATUSES), min_size=1, max_size=4))
    if draw(st.integers(0, 3)) == 0:
        body["action"] = draw(st.sampled_from(ACTIONS))
    if draw(st.integers(0, 3)) == 0:
        body["prompt"] = draw(st.sampled_from(PROMPT_PARTS))
    if draw(st.integers(0, 2)) == 0:
        pool = [*ids, UNKNOWN_ID]
        body["ids"] = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=25, unique=True))
    return body


def query(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    answer = client.post("/mj/task/query", json=body)
    assert answer.status_code == 200, answer.text
    assert "x-gateway-partial" not in answer.headers
    page: dict[str, Any] = answer.json()
    assert set(page) == PAGE_KEYS
    return page


@pytest.fixture(scope="module")
def alice(world: World) -> Iterator[httpx.Client]:
    with gateway_client(world) as client:
        yield client


def test_query_merges_two_upstreams_into_one_sorted_page(world: World, alice: httpx.Client) -> None:
    body = {"pageNumber": 1, "pageSize": 7, "sort": "submitTime,desc"}
    page = query(alice, body)
    assert {k: page[k] for k in reference_page(world, body)} == reference_page(world, body)
    assert page["totalElements"] == 90
    assert page["pageable"]["offset"] == 7
    sources = {t["id"]: name for name, rows in world.tasks.items() for t in rows}
    everything = query(alice, {"pageSize": 90})["content"]
    assert {sources[t["id"]] for t in everything} == {"java", "csharp"}


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_query_pages_match_a_reference_over_all_the_data(
    world: World, alice: httpx.Client, data: st.DataObject
) -> None:
    body = data.draw(query_bodies(world.all_ids), label="body")
    page = query(alice, body)
    expected = reference_page(world, body)
    assert [t["id"] for t in page["content"]] == [t["id"] for t in expected["content"]]
    assert {k: page[k] for k in expected} == expected
    assert page["pageable"]["offset"] == expected["number"] * expected["size"]


def test_query_with_ids_reaches_the_relay_through_list_lookups(
    world: World, alice: httpx.Client
) -> None:
    relay = world.sims["relay"]
    relay_ids = [t["id"] for t in world.tasks["relay"][:3]]
    java_id = world.tasks["java"][0]["id"]
    before = relay.count(LIST_BY_IDS)
    body = {"ids": [*relay_ids, java_id, UNKNOWN_ID], "pageSize": 10, "sort": "id,asc"}
    page = query(alice, body)
    assert [t["id"] for t in page["content"]] == sorted([*relay_ids, java_id])
    assert page["totalElements"] == 4
    assert relay.count(LIST_BY_IDS) == before + 1
    assert relay.count(QUERY) == 0  # the relay does not serve query; it is never asked


def test_query_is_limited_to_the_callers_upstreams(world: World) -> None:
    body = {"pageSize": 100, "sort": "id,asc"}
    with gateway_client(world, "bob") as bob:  # bob may use the first upstream only
        page = query(bob, body)
    assert [t["id"] for t in page["content"]] == sorted(t["id"] for t in world.tasks["java"])
    assert page["totalElements"] == 45


def test_bad_query_is_400_and_never_reaches_an_upstream(world: World, alice: httpx.Client) -> None:
    before = {name: sim.count(QUERY) for name, sim in world.sims.items()}
    for body in ({"pageSize": 0}, {"sort": "nope,desc"}, {"statusSet": "SUCCESS"}):
        answer = alice.post("/mj/task/query", json=body)
        assert answer.status_code == 400
        error = answer.json()
        assert error["code"] == 4 and error["description"].startswith("field '")
    assert {name: sim.count(QUERY) for name, sim in world.sims.items()} == before


def test_query_names_a_failing_upstream_and_fails_when_all_fail(world: World) -> None:
    java, csharp = world.sims["java"], world.sims["csharp"]
    # A gateway of its own, so that failures here open no circuit in the shared one.
    with (
        running_gateway(world_config(list(world.sims.values()))) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller(), timeout=10) as client,
    ):
        try:
            java.faults(error_rate=1)
            answer = client.post("/mj/task/query", json={"pageSize": 100})
            assert answer.status_code == 200
            assert answer.headers["x-gateway-partial"] == "java"
            assert answer.headers["x-cache"] == "PARTIAL"
            assert answer.json()["totalElements"] == len(world.tasks["csharp"])

            csharp.faults(error_rate=1)
            failed = client.post("/mj/task/query", json={"pageSize": 100})
            assert failed.status_code == 502
            assert failed.json()["code"] == 9
        finally:
            java.faults(error_rate=0)
            csharp.faults(error_rate=0)


def test_query_by_ids_names_a_failing_upstream_among_those_searched_by_list(
    world: World,
) -> None:
    """Upstreams without ``query`` are searched through list lookups; one of them failing is
    named in ``X-Gateway-Partial`` while the others' tasks still come back."""
    relay = world.sims["relay"]
    sims = list(world.sims.values())
    upstreams = [s.upstream_config(supports_query=s.name == "csharp", max_rps=10_000) for s in sims]
    config = make_config(sims, "", upstreams=upstreams, rate_limit=NO_LIMITS)
    ids = [t["id"] for t in world.tasks["java"][:3] + world.tasks["relay"][:3]]
    with (
        running_gateway(config) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller(), timeout=10) as client,
    ):
        try:
            relay.faults(error_rate=1)
            answer = client.post("/mj/task/query", json={"ids": ids, "pageSize": 100})
        finally:
            relay.faults(error_rate=0)
    assert answer.status_code == 200
    assert answer.headers["x-gateway-partial"] == "relay"
    assert {t["id"] for t in answer.json()["content"]} == set(ids[:3])


# -- /mj/task/list and /mj/task/queue ----------------------------------------------------------


def test_recent_list_merges_every_upstream_newest_first_at_most_100(
    world: World, alice: httpx.Client
) -> None:
    answer = alice.get("/mj/task/list")
    assert answer.status_code == 200
    assert "x-gateway-partial" not in answer.headers
    everything = [t for rows in world.tasks.values() for t in rows]
    assert len(everything) > 100
    expected = ordered(everything, "submitTime", True)[:100]
    assert [t["id"] for t in answer.json()] == [t["id"] for t in expected]
    assert answer.json() == expected


def test_queue_merges_every_upstreams_unfinished_tasks_oldest_first(
    world: World, alice: httpx.Client
) -> None:
    answer = alice.get("/mj/task/queue")
    assert answer.status_code == 200
    unfinished = [t for rows in world.tasks.values() for t in rows if t["status"] not in TERMINAL]
    expected = ordered(unfinished, "submitTime", False)
    assert [t["id"] for t in answer.json()] == [t["id"] for t in expected]
    assert {t["status"] for t in answer.json()} <= set(STATUSES) - TERMINAL


def test_recent_list_names_a_failing_upstream(world: World) -> None:
    relay = world.sims["relay"]
    with (
        running_gateway(world_config(list(world.sims.values()))) as gateway,
        httpx.Client(base_url=gateway.url, headers=caller(), timeout=10) as client,
    ):
        try:
            relay.faults(error_rate=1)
            answer = client.get("/mj/task/list")
            assert answer.status_code == 200
            assert answer.headers["x-gateway-partial"] == "relay"
            ids = {t["id"] for t in answer.json()}
            assert ids.isdisjoint(t["id"] for t in world.tasks["relay"])
            assert len(ids) == 90
        finally:
            relay.faults(error_rate=0)
