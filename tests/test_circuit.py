"""Circuit breakers: the state machine on a fake clock, then through the real app with an
upstream that dies (its process stopped), answers 5xx or hangs, and comes back.

While a circuit is open the gateway must not even connect to the upstream. That is checked
where it shows: a listener on the dead upstream's port counts the connections it receives,
and a sim that answers errors counts the requests it receives.
"""

from __future__ import annotations

import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import httpx
import pytest

from gateway.circuit import CircuitBreaker, CircuitState
from tests.gunicorn_support import metric
from tests.sims_extra import config_for, dead_upstream
from tests.support import SimProcess, caller, make_config, running_gateway

# -- the state machine on a fake clock -----------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def changes() -> list[tuple[CircuitState, CircuitState]]:
    return []


@pytest.fixture
def breaker(clock: Clock, changes: list[tuple[CircuitState, CircuitState]]) -> CircuitBreaker:
    return CircuitBreaker(
        threshold=3, cooldown_s=10.0, on_change=lambda a, b: changes.append((a, b)), clock=clock
    )


def state(breaker: CircuitBreaker) -> str:
    """The state, read afresh (a plain attribute read would be narrowed by mypy)."""
    return breaker.state


def fail(breaker: CircuitBreaker, times: int) -> None:
    for _ in range(times):
        assert breaker.allow()
        breaker.failure()


def test_stays_closed_below_the_threshold(
    breaker: CircuitBreaker, changes: list[tuple[CircuitState, CircuitState]]
) -> None:
    fail(breaker, 2)
    assert state(breaker) == "closed" and breaker.allow() and not breaker.is_open
    assert changes == []


def test_a_success_resets_the_count_of_consecutive_failures(breaker: CircuitBreaker) -> None:
    fail(breaker, 2)
    breaker.success()
    fail(breaker, 2)
    assert state(breaker) == "closed"
    fail(breaker, 1)
    assert state(breaker) == "open"


def test_opens_at_the_threshold_and_refuses_for_the_whole_cooldown(
    breaker: CircuitBreaker, clock: Clock, changes: list[tuple[CircuitState, CircuitState]]
) -> None:
    fail(breaker, 3)
    assert state(breaker) == "open" and breaker.is_open
    assert changes == [("closed", "open")]
    for offset in (0.0, 5.0, 9.999):
        clock.now = 1000.0 + offset
        assert not breaker.allow(), offset
        assert breaker.is_open
    assert state(breaker) == "open"


def test_after_the_cooldown_one_probe_goes_out_and_its_success_closes(
    breaker: CircuitBreaker, clock: Clock, changes: list[tuple[CircuitState, CircuitState]]
) -> None:
    fail(breaker, 3)
    clock.now += 10.0
    assert not breaker.is_open, "past the cooldown the upstream may be tried again"
    assert breaker.allow()
    assert state(breaker) == "half_open"
    # Only one probe at a time: everyone else still fails fast.
    assert not breaker.allow()
    assert not breaker.allow()
    breaker.success()
    assert state(breaker) == "closed" and breaker.failures == 0
    assert all(breaker.allow() for _ in range(5))
    assert changes == [("closed", "open"), ("open", "half_open"), ("half_open", "closed")]


def test_a_failed_probe_opens_the_circuit_for_another_full_cooldown(
    breaker: CircuitBreaker, clock: Clock, changes: list[tuple[CircuitState, CircuitState]]
) -> None:
    fail(breaker, 3)
    clock.now += 10.0
    assert breaker.allow()
    breaker.failure()
    assert state(breaker) == "open" and breaker.is_open
    clock.now += 9.9
    assert not breaker.allow()
    clock.now += 0.1
    assert breaker.allow()
    assert changes == [
        ("closed", "open"),
        ("open", "half_open"),
        ("half_open", "open"),
        ("open", "half_open"),
    ]


def test_a_probe_that_ends_without_an_answer_frees_the_probe_slot(
    breaker: CircuitBreaker, clock: Clock
) -> None:
    fail(breaker, 3)
    clock.now += 10.0
    assert breaker.allow()
    assert not breaker.allow()
    breaker.release_probe()  # e.g. cancelled, or held back by the outbound caps
    assert state(breaker) == "half_open"
    assert breaker.allow()


def test_without_a_clock_argument_it_runs_on_the_monotonic_clock() -> None:
    breaker = CircuitBreaker(threshold=1, cooldown_s=0.05)
    breaker.failure()
    assert not breaker.allow()
    time.sleep(0.06)
    assert breaker.allow()


class Timers:
    """A fake ``loop.call_later`` on the fake clock: keeps what is due when."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.due: list[tuple[float, Callable[[], None]]] = []

    def __call__(self, delay: float, callback: Callable[[], None]) -> None:
        self.due.append((self.clock.now + delay, callback))

    def run_until(self, now: float) -> None:
        """Advance the clock to ``now``, running each callback due by then at its time."""
        while ready := sorted((t, i) for i, (t, _) in enumerate(self.due) if t <= now):
            at, index = ready[0]
            self.clock.now = at
            self.due.pop(index)[1]()
        self.clock.now = now


def test_an_open_circuit_turns_half_open_when_its_cooldown_ends_without_any_request(
    clock: Clock, changes: list[tuple[CircuitState, CircuitState]]
) -> None:
    timers = Timers(clock)
    breaker = CircuitBreaker(3, 10.0, lambda a, b: changes.append((a, b)), clock, timers)
    fail(breaker, 3)
    timers.run_until(1009.9)
    assert state(breaker) == "open"
    timers.run_until(1010.0)
    assert state(breaker) == "half_open"
    assert changes == [("closed", "open"), ("open", "half_open")]
    assert breaker.allow()  # the probe may go out
    breaker.failure()
    assert state(breaker) == "open"
    timers.run_until(1020.0)
    assert state(breaker) == "half_open"


def test_a_wake_up_before_the_cooldown_ends_sleeps_again(clock: Clock) -> None:
    timers = Timers(clock)
    breaker = CircuitBreaker(1, 10.0, clock=clock, schedule=timers)
    breaker.failure()
    ((_, wake),) = timers.due
    timers.due.clear()
    clock.now += 9.9999  # a timer firing a hair early (its resolution)
    wake()
    assert state(breaker) == "open"
    assert [round(at - clock.now, 6) for at, _ in timers.due] == [0.0001]
    timers.run_until(clock.now + 0.0001)
    assert state(breaker) == "half_open"


# -- through the app -----------------------------------------------------------------------


class ConnectionCounter:
    """A listener on a port that counts the connections made to it and closes each one."""

    def __init__(self, port: int) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.sock.settimeout(0.05)
        self.accepted = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.accepted += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        self.sock.close()


@contextmanager
def counting_connections(port: int) -> Iterator[ConnectionCounter]:
    counter = ConnectionCounter(port)
    try:
        yield counter
    finally:
        counter.close()


def timed(http: httpx.Client, method: str, url: str, **kwargs: Any) -> tuple[httpx.Response, float]:
    started = time.monotonic()
    response = http.request(method, url, **kwargs)
    return response, time.monotonic() - started


def assert_circuit_open(response: httpx.Response, upstream: str) -> None:
    assert response.status_code == 503, response.text
    body = response.json()
    assert set(body) == {"code", "description", "result", "request_id"}
    assert upstream in body["description"] and "circuit open" in body["description"], body


def fetches(sim: SimProcess) -> int:
    return int(sim.stats()["requests"].get("GET /mj/task/{id}/fetch", 0))


def circuits(http: httpx.Client, base_url: str) -> dict[str, str]:
    """Circuit states as /readyz reports them."""
    upstreams: dict[str, str] = http.get(f"{base_url}/readyz").json()["upstreams"]
    return upstreams


def circuit_metric(base_url: str, upstream: str) -> float:
    return metric(base_url, "mjgate_circuit_state", upstream=upstream)


def running_task(sim: SimProcess) -> str:
    task_id = f"cb{uuid.uuid4().hex[:16]}"
    sim.seed(id=task_id, status="IN_PROGRESS")
    return task_id


# Running tasks are not cached at all, so every fetch asks the owner.
NO_RUNNING_CACHE = {"inflight_ttl_ms": 0, "not_found_ttl_ms": 0}


def test_circuit_opens_on_a_dead_upstream_fails_fast_and_closes_after_it_returns(
    sims: list[SimProcess],
) -> None:
    cooldown = 2.0
    flaky = SimProcess(
        "flaky", "java", "flaky-upstream-key-9", "mj-api-secret", "/mj/task/list-by-condition"
    )
    healthy = sims[1]
    flaky.start()
    try:
        task_id = running_task(flaky)
        config = make_config(
            [flaky, healthy],
            upstreams=[flaky.upstream_config(timeout_s=2), healthy.upstream_config()],
            circuit={"failure_threshold": 2, "cooldown_s": cooldown},
            cache=NO_RUNNING_CACHE,
        )
        with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
            fetch = f"{gateway.url}/mj/task/{task_id}/fetch"
            assert http.get(fetch, headers=caller()).status_code == 200  # owner: flaky

            flaky.stop()
            for _ in range(2):
                response = http.get(fetch, headers=caller())
                assert response.status_code == 502, response.text
                assert "flaky" in response.json()["description"]
            opened_at = time.monotonic()

            # Open: fail fast, without connecting. Everything here runs well inside the
            # cool-down; a listener now on flaky's port counts any connection attempt.
            with counting_connections(flaky.port) as listener:
                for _ in range(3):
                    response, took = timed(http, "GET", fetch, headers=caller())
                    assert_circuit_open(response, "flaky")
                    assert took < 0.25, took
                # Submits skip the open upstream: all go to the healthy one, none fail.
                for n in range(6):
                    response, took = timed(
                        http,
                        "POST",
                        f"{gateway.url}/mj/submit/imagine",
                        json={"prompt": f"a heron {n}"},
                        headers=caller(),
                    )
                    assert response.status_code == 200 and response.json()["code"] in (1, 22)
                    assert took < 0.5, took
                # A list fan-out answers with the rest and names the open upstream.
                unknown = [f"nope{uuid.uuid4().hex[:12]}" for _ in range(2)]
                listed = http.post(
                    f"{gateway.url}/mj/task/list-by-ids", json={"ids": unknown}, headers=caller()
                )
                assert listed.status_code == 200, listed.text
                assert listed.json() == []
                assert listed.headers["x-gateway-partial"] == "flaky"
                assert time.monotonic() - opened_at < cooldown, "test too slow to judge"
                assert listener.accepted == 0, "the gateway connected to an open upstream"
            assert healthy.stats()["submits"] == 6
            assert circuits(http, gateway.url) == {"flaky": "open", healthy.name: "closed"}
            assert circuit_metric(gateway.url, "flaky") == 2  # 0 closed, 1 half-open, 2 open

            # Back on the same port, with the same task. After the cool-down one probe goes
            # through and closes the circuit; from then on calls flow again.
            flaky.start()
            flaky.seed(id=task_id, status="IN_PROGRESS")
            time.sleep(max(0.0, opened_at + cooldown + 0.1 - time.monotonic()))
            response = http.get(fetch, headers=caller())
            assert response.status_code == 200, response.text
            assert response.json()["id"] == task_id
            assert fetches(flaky) == 1
            for _ in range(3):
                assert http.get(fetch, headers=caller()).status_code == 200
            assert fetches(flaky) == 4
            assert circuits(http, gateway.url)["flaky"] == "closed"
            assert circuit_metric(gateway.url, "flaky") == 0
            listed = http.post(
                f"{gateway.url}/mj/task/list-by-ids", json={"ids": [task_id]}, headers=caller()
            )
            assert "x-gateway-partial" not in listed.headers
            assert [t["id"] for t in listed.json()] == [task_id]
    finally:
        flaky.stop()


def test_the_state_metric_and_readyz_turn_half_open_on_time_on_a_quiet_gateway(
    sims: list[SimProcess],
) -> None:
    """Nothing asks for the dead upstream after its circuit opened: the circuit must still
    turn half-open when the cool-down ends, or the open-circuit alert keeps firing."""
    java = sims[0]
    config = config_for(
        [java.upstream_config(), dead_upstream("dead")],
        circuit={"failure_threshold": 1, "cooldown_s": 1.0},
    )
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        response = http.get(
            f"{gateway.url}/mj/task/{uuid.uuid4().hex[:16]}/fetch", headers=caller()
        )
        assert response.status_code == 502, response.text
        opened_at = time.monotonic()
        assert circuit_metric(gateway.url, "dead") == 2
        assert circuits(http, gateway.url)["dead"] == "open"
        time.sleep(max(0.0, opened_at + 1.3 - time.monotonic()))
        assert circuit_metric(gateway.url, "dead") == 1
        assert circuits(http, gateway.url) == {"java": "closed", "dead": "half_open"}


@pytest.mark.parametrize(
    ("fault", "status"),
    [
        ({"error_rate": 1.0}, 502),
        ({"timeout_rate": 1.0, "hang_s": 1.0}, 504),
    ],
    ids=["5xx", "timeout"],
)
def test_5xx_answers_and_timeouts_open_the_circuit_too(
    sims: list[SimProcess], fault: dict[str, float], status: int
) -> None:
    """The owner answers 500, or hangs past its timeout_s: after failure_threshold of those
    the circuit opens and calls fail fast without reaching it; once it is well again and the
    cool-down is over, the probe closes the circuit."""
    sim = sims[1]
    task_id = running_task(sim)
    config = make_config(
        sims[:2],
        upstreams=[sims[0].upstream_config(), sim.upstream_config(timeout_s=0.3)],
        circuit={"failure_threshold": 2, "cooldown_s": 1.0},
        cache=NO_RUNNING_CACHE,
    )
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:
        fetch = f"{gateway.url}/mj/task/{task_id}/fetch"
        assert http.get(fetch, headers=caller()).status_code == 200
        sim.faults(**fault)
        for _ in range(2):
            assert http.get(fetch, headers=caller()).status_code == status
        opened_at = time.monotonic()
        seen = fetches(sim)
        for _ in range(3):
            response, took = timed(http, "GET", fetch, headers=caller())
            assert_circuit_open(response, sim.name)
            assert took < 0.25, took
        assert fetches(sim) == seen, "a request reached an upstream whose circuit is open"
        sim.faults(error_rate=0.0, timeout_rate=0.0)
        time.sleep(max(0.0, opened_at + 1.1 - time.monotonic()))
        assert http.get(fetch, headers=caller()).status_code == 200
        assert http.get(fetch, headers=caller()).status_code == 200
        assert fetches(sim) == seen + 2


def test_a_hanging_upstream_trips_its_circuit_in_fan_outs_too(sims: list[SimProcess]) -> None:
    """An upstream that hangs is the costliest failure: every lookup of an id the gateway has
    not seen waits for it until the fan-out deadline. Those misses are timeouts like any
    other and must open its circuit, even though the fan-out deadline (0.5 s here; 10 s by
    default) is shorter than the upstream's timeout_s (5 s here; 15 s by default)."""
    hanging = sims[1]
    config = make_config(
        sims[:2],
        upstreams=[sims[0].upstream_config(), hanging.upstream_config(timeout_s=5)],
        circuit={"failure_threshold": 2, "cooldown_s": 30},
        fanout={"deadline_s": 0.5},
        cache=NO_RUNNING_CACHE,
    )
    hanging.faults(timeout_rate=1.0, hang_s=1.0)
    with running_gateway(config) as gateway, httpx.Client(timeout=10) as http:

        def lookup() -> tuple[httpx.Response, float]:
            url = f"{gateway.url}/mj/task/nope{uuid.uuid4().hex[:12]}/fetch"
            return timed(http, "GET", url, headers=caller())

        for _ in range(2):
            response, took = lookup()
            assert response.status_code == 504, response.text
            assert hanging.name in response.json()["description"]
            assert took >= 0.45
        response, took = lookup()
        assert took < 0.25, f"still waiting {took:.2f} s for an upstream that hangs every time"
        assert_circuit_open(response, hanging.name)
