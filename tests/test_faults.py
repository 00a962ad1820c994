"""Faults under a steady mixed load: every answer counted, none lost.

The gateway runs as deployed (gunicorn, two workers) with a real Redis of this module's own,
the three sims and a garbage upstream. A load of fetches, lists and submits runs throughout
each scenario (``tests.load``); one fault is injected for a few seconds, then cleared.
Every request must get an HTTP answer; a 5xx is allowed only as the gateway's JSON 502, 503
or 504 and only during the fault and a short recovery; no submit reaches an upstream twice.
``bench/faults.py`` runs the same faults for longer and prints the figures.
"""

from __future__ import annotations

import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.deployed import Deployed, deployed_gunicorn
from tests.garbage_upstream import GarbageProcess
from tests.load import HEADER, Figures, MixedLoad, figures
from tests.sims_extra import control, fresh, raw_get, unique_id
from tests.support import CALLER_KEYS, RedisProcess, SimProcess, caller, config_data, free_port

pytestmark = pytest.mark.timeout(120)

BEFORE_S, DURING_S, AFTER_S = 0.5, 2.0, 3.5
# After the fault is cleared, answers must be good again within this long.
RECOVERY_S = 3.0
CLEAN = {"ok", "partial", "502", "503", "504"}


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisProcess]:
    server = RedisProcess()
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def junk() -> Iterator[GarbageProcess]:
    upstream = GarbageProcess("junk", "junk-upstream-key-7", free_port())
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture(scope="module")
def gateway(
    tmp_path_factory: pytest.TempPathFactory,
    session_sims: list[SimProcess],
    redis: RedisProcess,
    junk: GarbageProcess,
) -> Iterator[Deployed]:
    config = config_data(session_sims, redis.url)
    config["upstreams"] = [
        *(sim.upstream_config(timeout_s=1) for sim in session_sims),
        junk.upstream_config(timeout_s=1),
    ]
    config |= {
        "circuit": {"failure_threshold": 3, "cooldown_s": 1},
        "fanout": {"deadline_s": 2},
        "logging": {"level": "warning", "format": "json"},
    }
    with deployed_gunicorn(tmp_path_factory.mktemp("faults"), config, workers=2) as deployed:
        yield deployed


@pytest.fixture
def ids(session_sims: list[SimProcess], junk: GarbageProcess) -> list[str]:
    """Fresh sims holding finished and running tasks; their ids."""
    fresh(session_sims)
    junk.set_mode("off")
    junk.reset()
    seeded = []
    for sim in session_sims:
        for n in range(8):
            task_id = unique_id()
            control(sim, "POST", "tasks", {"id": task_id, "status": "SUCCESS", "prompt": "seed"})
            seeded.append(task_id)
            if n < 3:
                running = unique_id()
                task = {"id": running, "playing": True, "task_seconds": 600, "prompt": "seed"}
                control(sim, "POST", "tasks", task)
                seeded.append(running)
    return seeded


def scenario(
    gateway: Deployed,
    ids: list[str],
    name: str,
    inject: Callable[[], Any],
    clear: Callable[[], Any],
    killing: bool = False,
) -> tuple[Figures, MixedLoad]:
    """The load for BEFORE_S, the fault for DURING_S, the load for AFTER_S more."""
    rss_before = sum(gateway.rss_mb().values())
    missing = [f"404{n:010d}" for n in range(5)]
    load = MixedLoad(gateway.url, caller(), ids, missing, callers=3, pause_s=0.02)
    load.prompt_prefix = f"{name}-{unique_id()}"
    with load:
        time.sleep(BEFORE_S)
        fault_at = time.monotonic()
        inject()
        time.sleep(DURING_S)
        cleared_at = time.monotonic()
        clear()
        time.sleep(AFTER_S)
    result = figures(name, load.answers, fault_at, cleared_at, fault_at if killing else None)
    result.rss_before_mb, result.rss_after_mb = rss_before, sum(gateway.rss_mb().values())
    print("\n" + " | ".join(HEADER) + "\n" + " | ".join(result.row()))
    assert result.answers > 100, result
    late = [a for a in load.answers if a.started > cleared_at + RECOVERY_S and not a.good]
    assert not late, f"not recovered {RECOVERY_S} s after the fault: {late[:5]}"
    return result, load


def assert_clean(result: Figures) -> None:
    """No answer lost (but those cut by a killed worker), every error a clean 502/503/504."""
    assert result.lost == result.cut, result
    wrong = {k: n for k, n in result.errors.items() if k not in CLEAN and "lost" not in k}
    assert not wrong, f"answers that are not clean: {wrong}"


def assert_no_submit_twice(load: MixedLoad, sims: list[SimProcess], junk: GarbageProcess) -> None:
    """Upstreams received at most the submits sent, and no prompt reached two of them, or
    one twice (each sim shows its tasks, the garbage upstream counts prompts)."""
    received = sum(control(sim, "GET", "stats")["submits"] for sim in sims)
    junk_stats = junk.stats()
    assert received + junk_stats["submits"] <= len(load.submitted)
    prompts: Counter[str] = Counter(junk_stats["prompts"])
    for sim in sims:
        tasks = raw_get(sim, "/mj/task/list").json()
        assert len(tasks) < 100, "the list is cut at 100: too many tasks to check"
        prompts.update(t["prompt"] for t in tasks if t.get("prompt") != "seed")
    twice = {p: n for p, n in prompts.items() if n > 1}
    assert not twice, f"submits that reached an upstream twice: {twice}"


def test_redis_killed_and_restarted(
    gateway: Deployed,
    ids: list[str],
    redis: RedisProcess,
    session_sims: list[SimProcess],
    junk: GarbageProcess,
) -> None:
    def kill() -> None:
        assert redis.proc is not None
        redis.proc.kill()
        redis.proc.wait()
        redis.proc = None

    result, load = scenario(gateway, ids, "redis killed", kill, redis.start)
    assert_clean(result)
    assert_no_submit_twice(load, session_sims, junk)


def test_redis_frozen_then_resumed(
    gateway: Deployed,
    ids: list[str],
    redis: RedisProcess,
    session_sims: list[SimProcess],
    junk: GarbageProcess,
) -> None:
    assert redis.proc is not None
    pid = redis.proc.pid
    result, load = scenario(
        gateway,
        ids,
        "redis frozen",
        lambda: os.kill(pid, signal.SIGSTOP),
        lambda: os.kill(pid, signal.SIGCONT),
    )
    assert_clean(result)
    assert_no_submit_twice(load, session_sims, junk)


def test_one_upstream_hanging(
    gateway: Deployed, ids: list[str], session_sims: list[SimProcess], junk: GarbageProcess
) -> None:
    hanging = session_sims[1]
    result, load = scenario(
        gateway,
        ids,
        "upstream hangs",
        lambda: control(hanging, "POST", "faults", {"timeout_rate": 1.0, "hang_s": 4}),
        lambda: control(hanging, "POST", "faults", {"timeout_rate": 0.0}),
    )
    assert_clean(result)
    assert_no_submit_twice(load, session_sims, junk)


def test_one_upstream_answering_garbage(
    gateway: Deployed, ids: list[str], session_sims: list[SimProcess], junk: GarbageProcess
) -> None:
    result, load = scenario(
        gateway,
        ids,
        "upstream garbage",
        lambda: junk.set_mode("mixed"),
        lambda: junk.set_mode("off"),
    )
    assert junk.stats()["requests"] >= 9, "every kind of garbage was sent at least once"
    assert_clean(result)
    assert_no_submit_twice(load, session_sims, junk)
    # A 50 MB answer must not stay in a worker's memory.
    assert result.rss_after_mb - result.rss_before_mb < 100, result


def test_a_worker_sigkilled(
    gateway: Deployed, ids: list[str], session_sims: list[SimProcess], junk: GarbageProcess
) -> None:
    victim = gateway.workers()[0]
    result, load = scenario(
        gateway,
        ids,
        "worker SIGKILL",
        lambda: os.kill(victim, signal.SIGKILL),
        lambda: None,
        killing=True,
    )
    assert_clean(result)
    assert_no_submit_twice(load, session_sims, junk)
    assert victim not in gateway.workers() and len(gateway.workers()) == 2


def test_the_load_counts_a_lost_answer() -> None:
    """The load itself: a gateway that is not there loses every answer, and says so."""
    url = f"http://127.0.0.1:{free_port()}"
    with MixedLoad(url, {"Authorization": f"Bearer {CALLER_KEYS['alice']}"}, ["1"]) as load:
        time.sleep(0.3)
    result = figures("nothing there", load.answers, 0.0, time.monotonic())
    assert result.answers > 0 and result.lost == result.answers
    with pytest.raises(AssertionError):
        assert_clean(result)
