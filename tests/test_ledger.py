"""The ledger: every accepted submit recorded with its caller, usage that equals what the
upstreams saw, the task log (filters, cursor paging), stuck tasks, retention, ``mjgate
usage``, and the store operations beneath, on the embedded store and on Redis."""

from __future__ import annotations

import asyncio
import csv
import io
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from prometheus_client import REGISTRY

from gateway.config import ConfigError
from gateway.configfile import config_from_dict
from gateway.ledger import action_of
from gateway.protocol import TERMINAL
from gateway.store import KeySpace, Store
from tests.gunicorn_support import metric
from tests.ledger_support import (
    as_caller,
    config,
    config_dict,
    eventually,
    faults,
    finished,
    submit,
)
from tests.sims_extra import assert_error, control, fresh, submits, unique_id
from tests.support import RedisProcess, SimProcess, running_gateway


@pytest.fixture
def sims(session_sims: list[SimProcess]) -> list[SimProcess]:
    return fresh(session_sims[:2])


def usage(ops: httpx.Client, **params: str) -> dict[str, Any]:
    response = ops.get("/admin/usage", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def task_log(ops: httpx.Client, **params: str) -> dict[str, Any]:
    response = ops.get("/admin/tasks", params=params)
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def _settled(rows: list[dict[str, Any]]) -> list[dict[str, Any]] | None:
    """The rows once every submit has its outcome counted (outcomes are written behind)."""
    return rows if rows and all(row["unfinished"] == 0 for row in rows) else None


def test_usage_equals_what_the_upstreams_saw(sims: list[SimProcess], store_url: str) -> None:
    java, csharp = sims
    outcomes: Counter[tuple[str, str, str]] = Counter()  # (client, action, final status)
    submitted_before = counted("mjgate_caller_submits_total", client="alice", action="IMAGINE")
    with (
        faults(java, task_seconds=0.3, failure_rate=0),
        faults(csharp, task_seconds=0.3, failure_rate=0),
        running_gateway(config(sims, store_url)) as gw,
        as_caller(gw, "alice") as alice,
        as_caller(gw, "bob") as bob,
        as_caller(gw, "ops") as ops,
    ):
        parent = submit(alice, "the parent")
        for sim in sims:
            control(sim, "POST", "faults", {"failure_rate": 0.5})
        made = [(alice, parent)] + [(alice, submit(alice)) for _ in range(4)]
        made += [(bob, submit(bob)) for _ in range(3)]
        cancelled = submit(bob, "cancel me")
        assert bob.post(f"/mj/task/{cancelled}/cancel").json()["code"] == 1
        made.append((bob, cancelled))
        tasks = [(http, finished(http, task_id)) for http, task_id in made]
        upscale: dict[str, Any] = {"taskId": parent, "action": "UPSCALE", "index": 1}
        tasks.append((alice, finished(alice, submit(alice, path="/mj/submit/change", **upscale))))
        for http, task in tasks:
            who = "alice" if http is alice else "bob"
            outcomes[(who, task["action"], task["status"])] += 1
        rows = eventually(
            lambda: _settled(usage(ops, group_by="client,action")["rows"]),
            what="usage to count every outcome",
        )
        csv_rows = list(csv.DictReader(io.StringIO(ops.get("/admin/usage?format=csv").text)))
        by_day = usage(ops, group_by="day,upstream")
        (logged,) = task_log(ops, action="UPSCALE")["tasks"]
    assert sum(row["submitted"] for row in rows) == submits(java) + submits(csharp) == 10
    totals = {(row["client"], row["action"]): row for row in rows}
    assert set(totals) == {("alice", "IMAGINE"), ("alice", "UPSCALE"), ("bob", "IMAGINE")}
    for (client, action), row in totals.items():
        mine = {status: n for (c, a, status), n in outcomes.items() if (c, a) == (client, action)}
        assert row["submitted"] == sum(mine.values())
        assert row["succeeded"] == mine.get("SUCCESS", 0)
        assert row["failed"] == mine.get("FAILURE", 0)
        assert row["cancelled"] == mine.get("CANCEL", 0) == (1 if client == "bob" else 0)
    assert {r["client"]: int(r["submitted"]) for r in csv_rows} == {"alice": 6, "bob": 4}
    assert {r["upstream"] for r in by_day["rows"]} <= {"java", "csharp"}
    assert sum(r["submitted"] for r in by_day["rows"]) == by_day["totals"]["submitted"] == 10
    assert logged["parent"] == parent and logged["client"] == "alice"
    alice_imagines = counted("mjgate_caller_submits_total", client="alice", action="IMAGINE")
    assert alice_imagines - submitted_before == 5


def test_the_task_log_pages_newest_first_and_filters(
    session_sims: list[SimProcess], store_url: str
) -> None:
    java = fresh(session_sims[:1])[0]
    with (
        faults(java, task_seconds=60),
        running_gateway(config([java], store_url)) as gw,
        as_caller(gw, "alice") as alice,
        as_caller(gw, "bob") as bob,
        as_caller(gw, "ops") as ops,
    ):
        secret_prompt = f"a private prompt {uuid.uuid4().hex}"
        ids = [submit(alice, secret_prompt if n == 0 else None) for n in range(5)]
        ids += [submit(bob) for _ in range(3)]
        cancelled = ids[-1]
        bob.post(f"/mj/task/{cancelled}/cancel")
        assert bob.get(f"/mj/task/{cancelled}/fetch").json()["status"] == "CANCEL"
        pages: list[list[dict[str, Any]]] = []
        cursor: dict[str, str] = {}
        while True:
            page = task_log(ops, limit="3", **cursor)
            pages.append(page["tasks"])
            if page["next_cursor"] is None:
                break
            cursor = {"cursor": page["next_cursor"]}
        everything = [task for page in pages for task in page]
        assert [len(page) for page in pages][:2] == [3, 3]
        assert [t["id"] for t in everything] == ids[::-1]  # newest first, each once
        times = [t["submitTime"] for t in everything]
        assert times == sorted(times, reverse=True)
        bobs = task_log(ops, client="bob")["tasks"]
        assert [t["id"] for t in bobs] == ids[:4:-1]
        assert {t["team"] for t in bobs} == {"red"}
        status = eventually(lambda: task_log(ops, status="CANCEL")["tasks"], what="CANCEL")
        assert [t["id"] for t in status] == [cancelled]
        assert task_log(ops, action="UPSCALE")["tasks"] == []
        until = str(everything[2]["submitTime"])
        assert [t["id"] for t in task_log(ops, until=until)["tasks"]][:1] == [everything[2]["id"]]
        since = task_log(ops, since=str(everything[1]["submitTime"]))["tasks"]
        assert [t["id"] for t in since] == [t["id"] for t in everything[:2]]
        first = everything[-1]
        assert secret_prompt not in ops.get("/admin/tasks").text  # a hash, never the prompt
        assert first["promptHash"] and first["action"] == "IMAGINE"
        assert first["upstream"] == "java" and first["mode"] == "" and first["code"] == 1


def test_stuck_tasks_are_listed_counted_and_left_unfinished(
    session_sims: list[SimProcess], store_url: str
) -> None:
    java = fresh(session_sims[:1])[0]
    data = config_dict([java], store_url, ledger={"stuck_after_s": 1})
    with (
        running_gateway(config_from_dict(data, env={})) as gw,
        as_caller(gw, "alice") as alice,
        as_caller(gw, "ops") as ops,
    ):
        started = time.monotonic()
        with faults(java, task_seconds=60):
            stuck = [submit(alice, f"stuck {n}") for n in range(2)]
        with faults(java, task_seconds=0.1, failure_rate=0):
            quick = submit(alice, "finishes in time")
        assert task_log(ops, state="stuck")["tasks"] == []  # not a second old yet
        assert finished(alice, quick)["status"] == "SUCCESS"
        time.sleep(max(0.0, started + 1.1 - time.monotonic()))

        def stuck_now() -> list[dict[str, Any]] | None:
            # The quick task's SUCCESS reaches the ledger just after the answer that saw it.
            tasks: list[dict[str, Any]] = task_log(ops, state="stuck")["tasks"]
            return tasks if sorted(t["id"] for t in tasks) == sorted(stuck) else None

        listed = eventually(stuck_now, what="exactly the stuck tasks")
        assert all(t["status"] not in TERMINAL for t in listed)
        eventually(
            lambda: metric(gw.url, "mjgate_stuck_tasks", upstream="java") == 2,
            what="the stuck gauge",
        )
        assert alice.get(f"/mj/task/{stuck[0]}/fetch").json()["status"] not in TERMINAL


def test_records_expire_after_the_retention(
    session_sims: list[SimProcess], redis_server: RedisProcess
) -> None:
    java = fresh(session_sims[:1])[0]
    for url in ("", redis_server.url):
        data = config_dict([java], url, ledger={"retention_days": 1 / 86400})
        with (
            running_gateway(config_from_dict(data, env={})) as gw,
            as_caller(gw, "alice") as alice,
            as_caller(gw, "ops") as ops,
        ):
            task_id = submit(alice)
            assert [t["id"] for t in task_log(ops)["tasks"]] == [task_id]
            key = KeySpace(data["redis"]["key_prefix"]).ledger_task("java", task_id)
            raw = redis.Redis.from_url(redis_server.url)
            if url:
                assert 0 < raw.pttl(key) <= 1000
            time.sleep(1.1)
            assert task_log(ops)["tasks"] == []
            assert task_log(ops, client="alice")["tasks"] == []
            assert raw.exists(key) == 0
            raw.close()


def test_the_admin_routes_are_for_admins_and_check_their_parameters(
    session_sims: list[SimProcess],
) -> None:
    with (
        running_gateway(config(session_sims[:1])) as gw,
        as_caller(gw, "carol") as carol,
        as_caller(gw, "ops") as ops,
    ):
        assert_error(carol.get("/admin/usage"), 403)
        assert_error(carol.get("/admin/tasks"), 403)
        for params in (
            {"group_by": "prompt"},
            {"from": "yesterday"},
            {"format": "xml"},
            {"client": "no such/client"},
        ):
            assert_error(ops.get("/admin/usage", params=params), 400)
        for params in (
            {"status": "DONE"},
            {"action": "imagine!"},
            {"limit": "0"},
            {"limit": "1001"},
            {"cursor": "not-a-cursor"},
            {"state": "lost"},
            {"since": "last week"},
        ):
            assert_error(ops.get("/admin/tasks", params=params), 400)
        days = usage(ops, **{"from": "2026-01-01T01:00:00+02:00", "to": "2026-01-02"})
        assert (days["from"], days["to"], days["rows"]) == ("2025-12-31", "2026-01-02", [])
        backwards = usage(ops, **{"from": "2026-05-02", "to": "2026-05-01"})
        assert backwards["rows"] == [] and backwards["totals"]["submitted"] == 0


def test_mjgate_usage_prints_what_the_route_answers(
    session_sims: list[SimProcess], redis_server: RedisProcess, tmp_path: Path
) -> None:
    java = fresh(session_sims[:1])[0]
    data = config_dict([java], redis_server.url)
    path = tmp_path / "mjgate.yaml"
    path.write_text(yaml.safe_dump(data))
    with (
        running_gateway(config_from_dict(data, env={})) as gw,
        as_caller(gw, "alice") as alice,
        as_caller(gw, "ops") as ops,
    ):
        for _ in range(3):
            submit(alice)
        answered = usage(ops, group_by="client,upstream")["rows"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-m", "gateway", "usage", "--config", str(path), *args]
        return subprocess.run(command, capture_output=True, text=True, timeout=30)

    printed = run("--group-by", "client,upstream", "--format", "json")
    assert printed.returncode == 0, printed.stderr
    assert yaml.safe_load(printed.stdout) == answered
    table = run("--client", "alice", "--group-by", "action").stdout.splitlines()
    header = ["action", "submitted", "succeeded", "failed", "cancelled", "unfinished"]
    assert table[0].split() == header
    assert table[1].split()[:2] == ["IMAGINE", "3"]
    embedded = tmp_path / "embedded.yaml"
    embedded.write_text(yaml.safe_dump(config_dict([java])))
    refused = subprocess.run(
        [sys.executable, "-m", "gateway", "usage", "--config", str(embedded)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert refused.returncode == 2 and "GET /admin/usage" in refused.stderr


def test_new_config_keys_are_checked_with_one_line_each() -> None:
    java = {"name": "java", "base_url": "http://127.0.0.1:1", "key": "upstream-key-123"}
    bad = {
        "upstreams": [java],
        "clients": [
            {"name": "a", "key": "a-key-0123456789", "visibility": "team"},
            {"name": "b", "key": "b-key-0123456789", "team": "x y", "visibility": "some"},
            {"name": "c", "key": "c-key-0123456789", "quota": {"submits_per_day": -1, "x": 1}},
        ],
        "quota": {"default": {"refund_failed": "maybe"}},
        "submit": {"dedup_window_s": -1},
        "ledger": {"retention_days": 0, "stuck_after_s": "long"},
    }
    with pytest.raises(ConfigError) as caught:
        config_from_dict(bad, env={})
    assert caught.value.problems == [
        "clients[0].visibility: team needs the client's team: set team",
        "clients[1].team: must match ^[A-Za-z0-9_.-]{1,64}$",
        "clients[1].visibility: must be one of all, team, own",
        "clients[2].quota.x: unknown key (expected one of: submits_per_day, "
        "submits_per_month, refund_failed)",
        "clients[2].quota.submits_per_day: must be at least 0",
        "quota.default.refund_failed: must be true or false, got 'maybe'",
        "submit.dedup_window_s: must be at least 0",
        "ledger.retention_days: must be greater than 0",
        "ledger.stuck_after_s: must be a number, got 'long'",
    ]


@pytest.mark.parametrize(
    ("kind", "body", "action"),
    [
        ("imagine", {}, "IMAGINE"),
        ("action", {"customId": "MJ::JOB::upsample::2::abc"}, "UPSCALE"),
        ("action", {"customId": "MJ::Outpaint::50::1::abc::SOLO"}, "ZOOM"),
        ("action", {"customId": "MJ::something::new"}, "OTHER"),
        ("change", {"action": "variation"}, "VARIATION"),
        ("simple-change", {"content": "123 R"}, "REROLL"),
        ("swap", {}, "SWAP_FACE"),
        ("not-a-route", {}, "OTHER"),
    ],
)
def test_a_submit_is_recorded_under_a_bounded_set_of_actions(
    kind: str, body: dict[str, Any], action: str
) -> None:
    assert action_of(kind, body) == action


# -- the store operations, on both stores --------------------------------------------------


@pytest.fixture
def keys() -> KeySpace:
    return KeySpace(f"t{uuid.uuid4().hex[:12]}")


async def test_a_record_turns_final_once_among_concurrent_callers(
    store: Store, keys: KeySpace
) -> None:
    key = keys.ledger_task("java", unique_id())
    await store.write_record(key, {"id": "1", "status": "SUBMITTED"}, 60_000)
    assert await store.advance_record(key, {"status": "IN_PROGRESS"}, False) is None
    finals = await asyncio.gather(
        *(store.advance_record(key, {"status": "SUCCESS"}, True) for _ in range(10))
    )
    winners = [f for f in finals if f is not None]
    assert winners == [{"id": "1", "status": "SUCCESS", "final": "1"}]
    assert await store.advance_record(key, {"status": "FAILURE"}, True) is None
    assert (await store.read_records([key]))[0]["status"] == "SUCCESS"
    missing = keys.ledger_task("java", unique_id())
    assert await store.advance_record(missing, {"status": "SUCCESS"}, True) is None
    assert await store.read_records([missing]) == [{}]  # never created by an update


async def test_indexes_range_newest_first_within_bounds(store: Store, keys: KeySpace) -> None:
    index = keys.ledger_index("client", "alice")
    entries = [(index, f"java/{n}", float(1000 + n // 2)) for n in range(8)]
    await store.index_add(entries, 60_000, keep_from=1001)
    # Scores 1000 (members 0, 1) were below keep_from: trimmed.
    everything = await store.index_range(index, 2000, 0, 100)
    assert everything == [
        ("java/7", 1003.0),
        ("java/6", 1003.0),
        ("java/5", 1002.0),
        ("java/4", 1002.0),
        ("java/3", 1001.0),
        ("java/2", 1001.0),
    ]
    assert await store.index_range(index, 1002, 1001, 3) == everything[2:5]
    assert await store.index_count([index, keys.ledger_index("all")], 1002, 1003) == [4, 0]
    await store.index_remove(index, "java/7")
    assert (await store.index_range(index, 2000, 0, 1))[0][0] == "java/6"


async def test_counts_add_up_and_records_expire(store: Store, keys: KeySpace) -> None:
    day = keys.usage_day("2026-05-01")
    await store.add_counts(day, {"alice|IMAGINE|java|submitted": 2}, 60_000)
    await store.add_counts(day, {"alice|IMAGINE|java|submitted": 1, "x|y|z|failed": 1}, 60_000)
    assert await store.read_records([day]) == [
        {"alice|IMAGINE|java|submitted": "3", "x|y|z|failed": "1"}
    ]
    short = keys.ledger_task("java", unique_id())
    await store.write_record(short, {"id": "1"}, 150)
    assert await store.read_records([short]) == [{"id": "1"}]
    await asyncio.sleep(0.25)
    assert await store.read_records([short]) == [{}]


async def test_set_if_absent_sets_once(store: Store, keys: KeySpace) -> None:
    key = keys.dedup("alice", "b:1")
    results = await asyncio.gather(*(store.set_if_absent(key, b"v", 60_000) for _ in range(5)))
    assert sorted(results) == [False] * 4 + [True]
    await store.set_many_if_absent({key: b"other", keys.owner("x"): b"java"}, 60_000)
    assert await store.mget([key, keys.owner("x")]) == [b"v", b"java"]
