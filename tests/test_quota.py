"""Quotas: a submit over ``submits_per_day`` / ``submits_per_month`` is a 429 naming the quota
and when it resets, with nothing sent upstream; a unit comes back when the upstream did not
take the work, and after FAILURE with ``refund_failed``. Real sim, real app, the embedded
store and Redis (exactness across two workers is in ``test_ledger_fleet``)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest

from gateway.config import ClientConfig, Config, Quota, QuotaConfig
from gateway.quota import QuotaRefusal, Quotas, Reservation
from gateway.store import KeySpace, Store
from tests.ledger_support import as_caller, clients, config, eventually, faults, finished, submit
from tests.sims_extra import assert_error, dead_upstream, fresh, submits
from tests.support import SimProcess, running_gateway

QUOTAS = {
    "alice": {"quota": {"submits_per_day": 2}},
    "bob": {"quota": {"submits_per_day": 1, "refund_failed": True}},
    "carol": {"quota": {"submits_per_month": 2}},
}


@pytest.fixture
def sim(session_sims: list[SimProcess]) -> SimProcess:
    return fresh(session_sims[:1])[0]


@pytest.fixture
def gateway_url(sim: SimProcess, store_url: str) -> Iterator[str]:
    with running_gateway(config([sim], store_url, clients=clients(**QUOTAS))) as gw:
        yield gw.url


def quota_body(response: httpx.Response) -> dict[str, Any]:
    body = assert_error(response, 429)
    quota: dict[str, Any] = body["quota"]
    assert response.headers["retry-after"].isdigit()
    assert int(response.headers["retry-after"]) >= 1
    return quota


def test_a_submit_over_the_daily_quota_is_a_429_and_reaches_no_upstream(
    sim: SimProcess, gateway_url: str
) -> None:
    with as_caller(gateway_url, "alice") as alice:
        submit(alice)
        submit(alice)
        refused = alice.post("/mj/submit/imagine", json={"prompt": "one too many"})
    quota = quota_body(refused)
    tomorrow = (datetime.now(UTC) + timedelta(days=1)).strftime("%Y-%m-%dT00:00:00Z")
    assert quota == {"name": "submits_per_day", "limit": 2, "resets_at": tomorrow}
    assert "submits_per_day" in refused.json()["description"]
    assert submits(sim) == 2


def test_a_monthly_quota_resets_on_the_first_of_next_month(
    sim: SimProcess, gateway_url: str
) -> None:
    with as_caller(gateway_url, "carol") as carol:
        submit(carol)
        submit(carol)
        quota = quota_body(carol.post("/mj/submit/imagine", json={"prompt": "month"}))
    first = datetime.now(UTC).replace(day=1)
    next_month = (first + timedelta(days=32)).replace(day=1)
    assert quota["name"] == "submits_per_month"
    assert quota["resets_at"] == next_month.strftime("%Y-%m-%dT00:00:00Z")
    assert submits(sim) == 2


def test_callers_without_a_quota_of_their_own_get_the_default(
    sim: SimProcess, store_url: str
) -> None:
    with (
        running_gateway(config([sim], store_url, quota={"default": {"submits_per_day": 1}})) as gw,
        as_caller(gw, "alice") as alice,
        as_caller(gw, "bob") as bob,
    ):
        submit(alice)
        submit(bob)  # a quota of its own caller each: counted apart
        assert quota_body(alice.post("/mj/submit/imagine", json={"prompt": "x"}))["limit"] == 1


@pytest.mark.parametrize(
    "refusal",
    [
        {"queue_full_rate": 1.0},  # code 23 from the only upstream
        {"error_rate": 1.0, "error_status": 503},  # HTTP 503: took no work
    ],
)
def test_a_submit_the_upstream_did_not_take_gives_its_unit_back(
    sim: SimProcess, gateway_url: str, refusal: dict[str, Any]
) -> None:
    with as_caller(gateway_url, "bob") as bob:
        with faults(sim, **refusal):
            refused = bob.post("/mj/submit/imagine", json={"prompt": "refused upstream"})
        assert refused.status_code in (200, 503), refused.text
        assert refused.json()["code"] != 1
        submit(bob)  # the one unit of the day is still there
        quota_body(bob.post("/mj/submit/imagine", json={"prompt": "now it is spent"}))


def test_a_banned_prompt_gives_its_unit_back(sim: SimProcess, gateway_url: str) -> None:
    with as_caller(gateway_url, "bob") as bob:
        banned = bob.post("/mj/submit/imagine", json={"prompt": "a banned thing"})
        assert banned.json()["code"] == 24, banned.text
        submit(bob)


def test_a_submit_that_never_left_gives_its_unit_back(
    session_sims: list[SimProcess], store_url: str
) -> None:
    dead = dead_upstream("dead", weight=1)
    data_clients = clients(bob={"quota": {"submits_per_day": 1}})
    gateway_config = config([], store_url, upstreams=[dead], clients=data_clients)
    with running_gateway(gateway_config) as gw, as_caller(gw, "bob") as bob:
        for _ in range(3):  # refused connections: never sent, never charged
            assert bob.post("/mj/submit/imagine", json={"prompt": "x"}).status_code == 502


def test_a_failed_task_is_refunded_with_refund_failed(sim: SimProcess, gateway_url: str) -> None:
    with faults(sim, task_seconds=0.2, failure_rate=1.0), as_caller(gateway_url, "bob") as bob:
        task_id = submit(bob, "fails")
        quota_body(bob.post("/mj/submit/imagine", json={"prompt": "spent until it fails"}))
        assert finished(bob, task_id)["status"] == "FAILURE"

        def refunded() -> bool:
            response = bob.post("/mj/submit/imagine", json={"prompt": f"again {task_id}"})
            return response.status_code == 200

        eventually(refunded, what="the refund")


def test_a_failed_task_is_not_refunded_without_refund_failed(
    sim: SimProcess, gateway_url: str
) -> None:
    with faults(sim, task_seconds=0.2, failure_rate=1.0), as_caller(gateway_url, "alice") as alice:
        first, second = submit(alice, "fails 1"), submit(alice, "fails 2")
        assert finished(alice, first)["status"] == finished(alice, second)["status"] == "FAILURE"
        quota_body(alice.post("/mj/submit/imagine", json={"prompt": "no refund"}))


# -- the store operations, on both stores --------------------------------------------------


def _config(quota: Quota) -> Config:
    return Config(upstreams=(), clients=(), quota=QuotaConfig(quota))


async def test_concurrent_reservations_never_pass_the_limit(store: Store) -> None:
    quotas = Quotas(store, KeySpace(f"q{datetime.now().timestamp()}"), _config(Quota(7)))
    client = ClientConfig(name="alice", key_sha256="")
    outcomes = await asyncio.gather(*(quotas.reserve(client) for _ in range(40)))
    held = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(held) == 7
    assert all(isinstance(o, QuotaRefusal) for o in outcomes if o not in held)
    await quotas.release(held[0])
    await quotas.release(held[0])  # twice: still one unit back per release, never below zero
    again = await asyncio.gather(*(quotas.reserve(client) for _ in range(5)))
    assert sum(isinstance(o, Reservation) for o in again) == 2


async def test_a_refused_reservation_charges_no_counter(store: Store) -> None:
    """Day and month are counted together or not at all: a day refused on the 15th leaves
    the month's count alone, so the 16th still gets the month's last two units."""
    keys = KeySpace(f"q{datetime.now().timestamp()}")
    quotas = Quotas(store, keys, _config(Quota(submits_per_day=3, submits_per_month=5)))
    client = ClientConfig(name="bob", key_sha256="")
    fifteenth, sixteenth = (datetime(2026, 3, d, 12, tzinfo=UTC) for d in (15, 16))
    first = [await quotas.reserve(client, fifteenth) for _ in range(4)]
    assert [type(o) for o in first] == [Reservation] * 3 + [QuotaRefusal]
    assert isinstance(first[3], QuotaRefusal) and first[3].quota == "submits_per_day"
    assert first[3].resets_at == datetime(2026, 3, 16, tzinfo=UTC)
    then = [await quotas.reserve(client, sixteenth) for _ in range(3)]
    assert [type(o) for o in then] == [Reservation] * 2 + [QuotaRefusal]
    assert isinstance(then[2], QuotaRefusal) and then[2].quota == "submits_per_month"
    assert then[2].resets_at == datetime(2026, 4, 1, tzinfo=UTC)
    assert isinstance(then[0], Reservation) and then[0].periods == ("d:2026-03-16", "m:2026-03")
