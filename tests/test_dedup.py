"""Duplicate submits: the same caller sending the same submit within the window, or the same
``Idempotency-Key``, reaches an upstream once and gets the first answer again
(``X-Mjgate-Deduplicated: true``); a retry after a 504 reaches no upstream at all. Real
sim, real app, the embedded store and Redis."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator

import httpx
import pytest

from tests.ledger_support import KEYS, as_caller, config, faults, submit
from tests.sims_extra import assert_error, fresh, submits, unique_id
from tests.support import SimProcess, running_gateway

HEADER = "x-mjgate-deduplicated"


@pytest.fixture
def sim(session_sims: list[SimProcess]) -> SimProcess:
    return fresh(session_sims[:1])[0]


@pytest.fixture
def gateway_url(sim: SimProcess, store_url: str) -> Iterator[str]:
    # One upstream that answers within a second, so a hung submit is a quick 504.
    upstreams = [sim.upstream_config(timeout_s=1)]
    with running_gateway(config([sim], store_url, upstreams=upstreams)) as gw:
        yield gw.url


async def _many(url: str, caller: str, body: dict[str, str], n: int) -> list[httpx.Response]:
    headers = {"mj-api-secret": KEYS[caller]}
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=15) as http:
        return list(
            await asyncio.gather(*(http.post("/mj/submit/imagine", json=body) for _ in range(n)))
        )


def test_twenty_concurrent_identical_submits_reach_the_upstream_once(
    sim: SimProcess, gateway_url: str
) -> None:
    body = {"prompt": f"twenty at once {unique_id()}", "state": "s"}
    answers = asyncio.run(_many(gateway_url, "alice", body, 20))
    assert [a.status_code for a in answers] == [200] * 20
    assert len({a.content for a in answers}) == 1  # every caller got the first one's answer
    assert sorted(a.headers.get(HEADER, "") for a in answers) == [""] + ["true"] * 19
    assert submits(sim) == 1


def test_the_same_json_in_another_key_order_is_the_same_submit(
    sim: SimProcess, gateway_url: str
) -> None:
    with as_caller(gateway_url, "alice") as alice:
        first = alice.post("/mj/submit/imagine", content=b'{"prompt":"p","state":"a"}')
        again = alice.post("/mj/submit/imagine", content=b'{"state": "a",  "prompt": "p"}')
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers[HEADER] == "true"
    assert submits(sim) == 1


def test_other_callers_routes_and_bodies_are_not_duplicates(
    sim: SimProcess, gateway_url: str
) -> None:
    prompt = f"not a duplicate {unique_id()}"
    with as_caller(gateway_url, "alice") as alice, as_caller(gateway_url, "bob") as bob:
        ids = {
            submit(alice, prompt),
            submit(bob, prompt),
            submit(alice, prompt + "!"),
            submit(alice, prompt, path="/mj/submit/shorten"),
        }
    assert len(ids) == 4 and submits(sim) == 4


def test_a_retry_after_a_504_reaches_no_upstream(sim: SimProcess, gateway_url: str) -> None:
    body = {"prompt": f"timed out {unique_id()}"}
    with as_caller(gateway_url, "alice") as alice:
        with faults(sim, timeout_rate=1.0, hang_s=3):
            first = alice.post("/mj/submit/imagine", json=body)
        retry = alice.post("/mj/submit/imagine", json=body)
    assert_error(first, 504)
    assert retry.status_code == 504 and retry.headers[HEADER] == "true"
    assert retry.json() == first.json()  # the first answer, its request id included
    assert submits(sim) == 1


def test_the_window_ends_and_zero_turns_it_off(sim: SimProcess, store_url: str) -> None:
    body = {"prompt": f"windowed {unique_id()}"}
    for window, expected in ((0.5, 2), (0, 3)):
        fresh([sim])
        with (
            running_gateway(config([sim], store_url, submit={"dedup_window_s": window})) as gw,
            as_caller(gw, "alice") as alice,
        ):
            submit(alice, **body)
            submit(alice, **body)
            time.sleep(0.6)
            submit(alice, **body)
        assert submits(sim) == expected, window


def test_an_idempotency_key_replays_its_answer_for_a_day(sim: SimProcess, store_url: str) -> None:
    """The key, not the window, decides: it works with the window off, and past it."""
    key = {"Idempotency-Key": f"order-{unique_id()}"}
    with (
        running_gateway(config([sim], store_url, submit={"dedup_window_s": 0})) as gw,
        as_caller(gw, "alice") as alice,
    ):
        first = alice.post("/mj/submit/imagine", json={"prompt": "keyed"}, headers=key)
        again = alice.post("/mj/submit/imagine", json={"prompt": "keyed"}, headers=key)
        other = alice.post("/mj/submit/imagine", json={"prompt": "keyed"})
    assert first.status_code == again.status_code == 200
    assert again.content == first.content and again.headers[HEADER] == "true"
    assert other.json()["result"] != first.json()["result"]
    assert submits(sim) == 2


def test_an_idempotency_key_reused_with_another_body_is_a_422(
    sim: SimProcess, gateway_url: str
) -> None:
    key = {"Idempotency-Key": f"order-{unique_id()}"}
    with as_caller(gateway_url, "alice") as alice:
        submit_ok = alice.post("/mj/submit/imagine", json={"prompt": "first"}, headers=key)
        changed = alice.post("/mj/submit/imagine", json={"prompt": "second"}, headers=key)
        other_route = alice.post("/mj/submit/shorten", json={"prompt": "first"}, headers=key)
        long_key = {"Idempotency-Key": "k" * 256}
        too_long = alice.post("/mj/submit/imagine", json={"prompt": "x"}, headers=long_key)
    assert submit_ok.status_code == 200
    assert "Idempotency-Key" in assert_error(changed, 422)["description"]
    assert_error(other_route, 422)
    assert_error(too_long, 400)
    assert submits(sim) == 1


def test_an_answer_that_sent_nothing_is_not_replayed(sim: SimProcess, gateway_url: str) -> None:
    """A submit every upstream refused before taking any work may go again at once."""
    body = {"prompt": f"refused first {unique_id()}"}
    with as_caller(gateway_url, "alice") as alice:
        with faults(sim, error_rate=1.0, error_status=503):
            refused = alice.post("/mj/submit/imagine", json=body)
        accepted = alice.post("/mj/submit/imagine", json=body)
    assert refused.status_code == 503 and HEADER not in refused.headers
    assert accepted.json()["code"] == 1 and HEADER not in accepted.headers
    assert submits(sim) == 2
