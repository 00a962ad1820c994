"""What the benchmarks share: processes that always get stopped, pinning, the sim, the
gateway, redis-server, wrk, and the printed tables and verdicts.

Every process a benchmark starts goes through ``Processes``: it runs in its own session (a
Ctrl-C reaches only the benchmark, which then stops its children in order), is pinned to a
core, and gets ``PR_SET_PDEATHSIG`` so it dies with the benchmark even if the benchmark is
killed with SIGKILL. Servers run on the first core, load generators on the second.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType, TracebackType
from typing import IO, Any, Protocol, TypeVar

import httpx
import yaml

__all__ = [
    "CLIENT_KEY",
    "GATEWAY_SRC",
    "LOAD_CORE",
    "REPO",
    "SERVER_CORE",
    "UPSTREAM_KEY",
    "BenchError",
    "BenchMain",
    "CpuMeter",
    "Gateway",
    "Processes",
    "QuietWait",
    "RedisCounter",
    "Sim",
    "Verdict",
    "WrkResult",
    "add_quiet_wait",
    "add_wrk_options",
    "alternating",
    "bench_main",
    "bench_parser",
    "caller_headers",
    "fetch_twice",
    "free_port",
    "gateway_config",
    "gateway_origin",
    "install_signal_handlers",
    "machine_note",
    "median",
    "need",
    "percentile",
    "pin_self_to_load_core",
    "pinned_child",
    "positive_int",
    "print_round",
    "print_table",
    "print_verdicts",
    "ratios",
    "run_bench",
    "run_wrk",
    "start_bench_server",
    "start_gateway",
    "start_nginx",
    "start_redis",
    "start_sim",
    "wait_http",
    "wait_redis",
    "wrk_note",
    "wrk_runs",
]

REPO = Path(__file__).resolve().parents[1]
# The tree whose ``gateway`` package the gateway and sim processes run: this checkout unless
# MJGATE_BENCH_SRC names another (a worktree of an older commit, for before/after figures).
GATEWAY_SRC = Path(os.environ.get("MJGATE_BENCH_SRC") or REPO).resolve()
CLIENT_KEY = "bench-client-key-6f1c2a9e4b7d"
UPSTREAM_KEY = "bench-upstream-key-3d8e5f0a1c"

_CORES = sorted(os.sched_getaffinity(0))
SERVER_CORE: int | None = _CORES[0] if len(_CORES) >= 2 else None
LOAD_CORE: int | None = _CORES[1] if len(_CORES) >= 2 else None

# Debian packages that provide the binaries the benchmarks need.
APT_PACKAGES = {"wrk": "wrk", "nginx": "nginx", "redis-server": "redis-server"}

_T = TypeVar("_T")
_PR_SET_PDEATHSIG = 1
_LIBC = ctypes.CDLL(None, use_errno=True)


class BenchError(Exception):
    """The benchmark could not run: a binary is missing or a process would not start."""


def need(*binaries: str) -> dict[str, str]:
    """Paths of the binaries a benchmark needs; BenchError naming every missing one."""
    found = {name: shutil.which(name) for name in binaries}
    missing = [name for name, path in found.items() if path is None]
    if missing:
        packages = " ".join(APT_PACKAGES.get(name, name) for name in missing)
        raise BenchError(
            f"missing binaries: {', '.join(missing)}; install them with: "
            f"apt-get install -y {packages}"
        )
    return {name: path for name, path in found.items() if path is not None}


def install_signal_handlers() -> None:
    """SIGINT, SIGTERM and SIGHUP unwind as KeyboardInterrupt, so every ``finally`` stops
    its processes (SIGINT too: a shell starts background jobs with SIGINT ignored)."""

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGINT, interrupt)
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)


def pin_self_to_load_core() -> None:
    """The benchmark process itself (its asyncio load generators) runs on the load core."""
    if LOAD_CORE is not None:
        os.sched_setaffinity(0, {LOAD_CORE})


def pinned_child(core: int | None) -> Callable[[], None]:
    def setup() -> None:
        # What `taskset -c CORE` does, without depending on the binary.
        if core is not None:
            os.sched_setaffinity(0, {core})
        _LIBC.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return setup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class Processes:
    """Starts child processes and stops all of them, newest first, on exit (error or not)."""

    def __init__(self) -> None:
        self._children: list[tuple[str, subprocess.Popen[bytes], list[IO[bytes]]]] = []
        self.workdir = Path(tempfile.mkdtemp(prefix="mjgate-bench-"))

    def __enter__(self) -> Processes:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop_all()

    def start(
        self,
        name: str,
        args: Sequence[str],
        *,
        core: int | None,
        stdout: Path | None = None,
        stderr: Path | None = None,
        cwd: Path = REPO,
    ) -> subprocess.Popen[bytes]:
        """Run ``args`` in ``cwd`` pinned to ``core``; stdout/stderr to files or discarded."""
        files: list[IO[bytes]] = []

        def sink(path: Path | None) -> IO[bytes] | int:
            if path is None:
                return subprocess.DEVNULL
            handle = path.open("wb")
            files.append(handle)
            return handle

        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=sink(stdout),
            stderr=sink(stderr),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=pinned_child(core),
        )
        self._children.append((name, proc, files))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        for entry in list(self._children):
            if entry[1] is proc:
                self._stop(entry)
                self._children.remove(entry)

    def stop_all(self) -> None:
        while self._children:
            self._stop(self._children.pop())
        shutil.rmtree(self.workdir, ignore_errors=True)

    @staticmethod
    def _stop(entry: tuple[str, subprocess.Popen[bytes], list[IO[bytes]]]) -> None:
        _, proc, files = entry
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
        for handle in files:
            handle.close()


def wait_http(
    url: str,
    proc: subprocess.Popen[bytes],
    what: str,
    *,
    timeout_s: float = 15.0,
    log: Path | None = None,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Poll ``url`` until it answers 200; BenchError (with the log's tail) if the process
    exits or the time runs out."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with code {proc.returncode}{_tail(log)}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, headers=headers, timeout=1.0).status_code == 200:
                return
        time.sleep(0.05)
    raise BenchError(f"{what} did not answer {url} within {timeout_s:.0f} s{_tail(log)}")


def _tail(log: Path | None) -> str:
    if log is None or not log.exists():
        return ""
    lines = log.read_text(errors="replace").splitlines()[-15:]
    return "\n  " + "\n  ".join(lines) if lines else ""


# -- redis-server ----------------------------------------------------------------------------


def start_redis(procs: Processes, core: int | None = SERVER_CORE) -> str:
    """A throwaway redis-server (on the server core unless told), no persistence; its URL."""
    binary = need("redis-server")["redis-server"]
    port = free_port()
    directory = procs.workdir / "redis"
    directory.mkdir()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly"]
    args += ["no", "--dir", str(directory), "--protected-mode", "no"]
    log = procs.workdir / "redis.log"
    proc = procs.start("redis-server", args, core=core, stdout=log, stderr=log)
    wait_redis(port, proc, log)
    return f"redis://127.0.0.1:{port}/0"


def wait_redis(port: int, proc: subprocess.Popen[bytes], log: Path | None = None) -> None:
    """Poll redis-server on ``port`` until it answers PING; BenchError (with the log's tail)
    if the process exits or ten seconds pass."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"redis-server exited with code {proc.returncode}{_tail(log)}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=0.2) as sock,
        ):
            sock.sendall(b"PING\r\n")
            if sock.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise BenchError(f"redis-server did not answer on port {port}{_tail(log)}")


class RedisCounter:
    """Commands redis-server executed (``INFO commandstats``), to count store round trips."""

    def __init__(self, url: str) -> None:
        import redis

        self._client = redis.Redis.from_url(url)

    def reset(self) -> None:
        self._client.config_resetstat()

    def calls(self) -> dict[str, int]:
        stats = self._client.info("commandstats")
        return {
            name.removeprefix("cmdstat_"): int(values["calls"])
            for name, values in stats.items()
            if not name.startswith(("cmdstat_config", "cmdstat_info"))
        }

    def close(self) -> None:
        self._client.close()


# -- mjgate sim ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Sim:
    """A running ``mjgate sim`` (java flavor: ``mj-api-secret`` auth, both list paths)."""

    name: str
    port: int
    key: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def auth_headers(self) -> dict[str, str]:
        return {"mj-api-secret": self.key}

    def control(self, method: str, path: str, body: Any = None) -> Any:
        response = httpx.request(method, f"{self.url}/_sim/{path}", json=body, timeout=10)
        response.raise_for_status()
        return response.json()

    def seed(self, task: Mapping[str, Any]) -> bytes:
        """Add a task; returns the bytes the sim answers a fetch of it with."""
        response = httpx.post(f"{self.url}/_sim/tasks", json=dict(task), timeout=10)
        response.raise_for_status()
        return response.content

    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = self.control("GET", "stats")
        return result

    def fetch_calls(self) -> int:
        """``GET /mj/task/{id}/fetch`` requests served so far."""
        return int(self.stats()["requests"].get("GET /mj/task/{id}/fetch", 0))

    def upstream_config(self) -> dict[str, Any]:
        """This sim as a gateway upstream, its outbound caps far above any benchmark's rate
        (the caps are taken from the store on every call, but never make a call wait)."""
        return {
            "name": self.name,
            "base_url": self.url,
            "auth": "mj-api-secret",
            "key": self.key,
            "list_by_ids_path": "/mj/task/list-by-condition",
            "timeout_s": 10,
            "max_rps": 1_000_000,
            "max_concurrency": 10_000,
        }


def start_sim(
    procs: Processes,
    name: str,
    *,
    latency_ms: float = 0.0,
    task_seconds: float | None = None,
    key: str = UPSTREAM_KEY,
    core: int | None = SERVER_CORE,
) -> Sim:
    """``python -m gateway sim`` (from ``GATEWAY_SRC``) on the server core unless told."""
    port = free_port()
    args = [sys.executable, "-m", "gateway", "sim", "--port", str(port), "--flavor", "java"]
    args += ["--key", key, "--latency-ms", str(latency_ms), "--seed", "7"]
    if task_seconds is not None:
        args += ["--task-seconds", str(task_seconds)]
    log = procs.workdir / f"sim-{name}.log"
    proc = procs.start(f"sim {name}", args, core=core, stdout=log, stderr=log, cwd=GATEWAY_SRC)
    sim = Sim(name, port, key)
    wait_http(f"{sim.url}/_sim/health", proc, f"sim {name}", log=log)
    return sim


# -- the gateway -----------------------------------------------------------------------------


def caller_headers() -> dict[str, str]:
    return {"Authorization": f"Bearer {CLIENT_KEY}"}


def gateway_config(
    sims: Sequence[Sim],
    redis_url: str,
    *,
    log_level: str = "info",
    cache: Mapping[str, Any] | None = None,
    fanout: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """A production-like config: Redis, one real client key (with a rate limit far above
    the benchmark's rate, so a limiter is exercised but never refuses), metrics and JSON
    logs on."""
    limit = {"rps": 1_000_000, "burst": 1_000_000}
    return {
        "server": {"host": "127.0.0.1"},
        "redis": {"url": redis_url, "key_prefix": f"bench{os.getpid()}"},
        "upstreams": [sim.upstream_config() for sim in sims],
        "clients": [{"name": "bench", "key": CLIENT_KEY, "rate_limit": limit}],
        "rate_limit": {"default": limit},
        "cache": dict(cache or {}),
        "fanout": {"deadline_s": 5, **(fanout or {})},
        "metrics": {"enabled": True, "path": "/metrics"},
        "logging": {"level": log_level, "format": "json"},
    }


@dataclass(frozen=True)
class Gateway:
    name: str
    port: int
    log: Path  # the gateway's stdout: its JSON log lines
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_lines(self) -> int:
        with self.log.open("rb") as handle:
            return sum(1 for _ in handle)

    def metrics_state(self) -> str:
        """Whether the gateway serves its metrics (the config turns them on)."""
        try:
            response = httpx.get(f"{self.url}/metrics", headers=caller_headers(), timeout=5)
        except httpx.HTTPError as exc:
            return f"metrics: /metrics failed ({exc})"
        if response.status_code == 200:
            return "metrics: on (GET /metrics answers 200)"
        return (
            f"metrics: enabled in the config, but GET /metrics answers {response.status_code} "
            "(this gateway build does not serve metrics yet)"
        )


def start_gateway(procs: Processes, name: str, config: Mapping[str, Any]) -> Gateway:
    """``python -m gateway serve --config FILE`` (from ``GATEWAY_SRC``) on the server core (one
    process, uvicorn with uvloop and httptools). Its stdout, the JSON log, goes to a file:
    writing the log is part of the cost being measured."""
    port = free_port()
    config_file = procs.workdir / f"{name}.yaml"
    config_file.write_text(yaml.safe_dump(dict(config), sort_keys=False))
    log, errors = procs.workdir / f"{name}.log", procs.workdir / f"{name}.err"
    args = [sys.executable, "-m", "gateway", "serve", "--config", str(config_file)]
    args += ["--port", str(port)]
    proc = procs.start(
        f"gateway {name}", args, core=SERVER_CORE, stdout=log, stderr=errors, cwd=GATEWAY_SRC
    )
    wait_http(f"http://127.0.0.1:{port}/readyz", proc, f"gateway {name}", log=errors)
    return Gateway(name, port, log, proc)


def start_bench_server(
    procs: Processes,
    what: str,
    module: str,
    args: Sequence[str],
    probe_path: str,
    headers: Mapping[str, str] | None = None,
) -> str:
    """``python -m MODULE --port P ARGS`` (a server of this package) on the server core; its
    origin, once ``probe_path`` answers 200."""
    port = free_port()
    log = procs.workdir / f"{module}.log"
    command = [sys.executable, "-m", module, "--port", str(port), *args]
    proc = procs.start(what, command, core=SERVER_CORE, stdout=log, stderr=log)
    origin = f"http://127.0.0.1:{port}"
    wait_http(origin + probe_path, proc, what, log=log, headers=headers)
    return origin


# -- nginx -----------------------------------------------------------------------------------


def start_nginx(
    procs: Processes, template: str, values: Mapping[str, str], probe_path: str
) -> tuple[str, Path]:
    """nginx in the foreground from ``template`` (``@USER@``, ``@DIR@``, ``@PORT@`` and the
    ``values`` placeholders filled in) in ``procs.workdir / "nginx"``, on the server core;
    its origin, once ``probe_path`` answers 200 to the caller's key, and its directory."""
    binary = need("nginx")["nginx"]
    directory = procs.workdir / "nginx"
    directory.mkdir(exist_ok=True)
    port = free_port()
    text = template
    # As root the worker would switch to "nobody" and lose access to the temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    filled = {"@USER@": user, "@DIR@": str(directory), "@PORT@": str(port), **values}
    for placeholder, value in filled.items():
        text = text.replace(placeholder, value)
    config = directory / "nginx.conf"
    config.write_text(text)
    log = directory / "error.log"
    args = [binary, "-p", str(directory), "-c", str(config), "-e", str(log)]
    proc = procs.start("nginx", args, core=SERVER_CORE, stdout=log, stderr=log)
    origin = f"http://127.0.0.1:{port}"
    wait_http(origin + probe_path, proc, "nginx", log=log, headers=caller_headers())
    return origin, directory


def fetch_twice(
    name: str, url: str, headers: Mapping[str, str], expected: bytes, source: str
) -> httpx.Response:
    """Fetch ``url`` twice; BenchError unless the second answer is 200 with ``expected``
    (the bytes of ``source``, as the error says); that second answer."""
    with httpx.Client(headers=dict(headers), timeout=10) as client:
        client.get(url)
        response = client.get(url)
    if response.status_code != 200 or response.content != expected:
        raise BenchError(
            f"{name} answered {response.status_code} with other bytes than {source} "
            f"({len(response.content)} vs {len(expected)} bytes)"
        )
    return response


# -- wrk -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WrkResult:
    requests: int
    seconds: float
    rps: float
    p50_ms: float
    p99_ms: float
    bad_responses: int  # non-2xx/3xx answers plus socket errors
    output: str


_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def _latency_ms(text: str) -> float:
    match = re.fullmatch(r"([0-9.]+)(us|ms|s|m)", text)
    if match is None:
        raise BenchError(f"cannot read wrk latency {text!r}")
    return float(match.group(1)) * _UNITS_MS[match.group(2)]


def run_wrk(
    url: str,
    *,
    headers: Mapping[str, str],
    duration_s: float,
    connections: int,
    threads: int = 1,
    script: Path | None = None,
) -> WrkResult:
    """One wrk run pinned to the load core, with its latency distribution; ``script`` is a
    wrk Lua script (its ``request()`` picks each request's path)."""
    binary = need("wrk")["wrk"]
    args = [binary, f"-t{threads}", f"-c{connections}", f"-d{duration_s:g}s", "--latency"]
    args += ["--timeout", "5s"]
    if script is not None:
        args += ["-s", str(script)]
    for name, value in headers.items():
        args += ["-H", f"{name}: {value}"]
    args.append(url)
    done = subprocess.run(
        args,
        capture_output=True,
        text=True,
        timeout=duration_s + 30,
        preexec_fn=pinned_child(LOAD_CORE),
        check=False,
    )
    output = done.stdout
    if done.returncode != 0:
        raise BenchError(f"wrk failed ({done.returncode}): {done.stderr or output}")
    try:
        totals = re.search(r"(\d+) requests in ([0-9.]+)(us|ms|s|m)", output)
        rps = re.search(r"Requests/sec:\s+([0-9.]+)", output)
        p50 = re.search(r"^\s+50%\s+(\S+)", output, re.MULTILINE)
        p99 = re.search(r"^\s+99%\s+(\S+)", output, re.MULTILINE)
        assert totals and rps and p50 and p99
    except AssertionError:
        raise BenchError(f"cannot read wrk output:\n{output}") from None
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", output)
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", output
    )
    bad_count = int(bad.group(1)) if bad else 0
    if errors:
        bad_count += sum(int(n) for n in errors.groups())
    return WrkResult(
        requests=int(totals.group(1)),
        seconds=_latency_ms(totals.group(2) + totals.group(3)) / 1000,
        rps=float(rps.group(1)),
        p50_ms=_latency_ms(p50.group(1)),
        p99_ms=_latency_ms(p99.group(1)),
        bad_responses=bad_count,
        output=output,
    )


def add_wrk_options(
    parser: argparse.ArgumentParser,
    *,
    connections: int,
    rounds: int,
    rounds_help: str = "rounds over all targets",
    threads: bool = True,
) -> None:
    """The wrk options of the benchmarks that run targets in rounds."""
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk warm-up per run")
    parser.add_argument("--connections", type=int, default=connections, help="wrk connections")
    if threads:
        parser.add_argument("--threads", type=int, default=1, help="wrk threads")
    parser.add_argument("--rounds", type=positive_int, default=rounds, help=rounds_help)


def wrk_note(args: argparse.Namespace) -> str:
    """The wrk settings ``add_wrk_options`` parsed, as printed above the rounds."""
    return (
        f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
        f"(after a {args.warmup:g} s warm-up run), {args.rounds} rounds in alternating order"
    )


def wrk_runs(url: str, headers: Mapping[str, str], args: argparse.Namespace) -> list[WrkResult]:
    """The warm-up run (unless ``--warmup 0``), then the measured one: the last."""
    durations = [args.warmup, args.duration] if args.warmup > 0 else [args.duration]
    return [
        run_wrk(
            url,
            headers=headers,
            duration_s=duration,
            connections=args.connections,
            threads=args.threads,
        )
        for duration in durations
    ]


# -- numbers and printing --------------------------------------------------------------------


def percentile(values: Sequence[float], share: float) -> float:
    """Nearest-rank percentile (``share`` in 0..1) of a non-empty sequence."""
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(share * len(ordered) + 0.5) - 1))
    return ordered[index]


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def print_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
    """A plain aligned table: first column left-aligned, the rest right-aligned."""
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        cells = [
            str(cell).ljust(width) if i == 0 else str(cell).rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    print(line(header))
    print("  ".join("-" * width for width in widths))
    for row in rows:
        print(line(row))


def alternating(items: Sequence[_T], round_index: int) -> Sequence[_T]:
    """``items`` in order on even rounds, reversed on odd ones (to cancel the drift)."""
    return items if round_index % 2 == 0 else items[::-1]


def ratios(results: Mapping[str, Sequence[WrkResult]], name: str, reference: str) -> list[float]:
    """``name``'s req/s over ``reference``'s, round by round."""
    pairs = zip(results[name], results[reference], strict=True)
    return [mine.rps / theirs.rps for mine, theirs in pairs]


def print_round(
    round_index: int,
    names: Sequence[str],
    results: Mapping[str, Sequence[WrkResult]],
    reference: str,
) -> None:
    """One line per round: each target's req/s and its ratio to ``reference``'s."""
    base = results[reference][-1].rps
    cells = [
        f"{name} {results[name][-1].rps:,.0f}"
        + ("" if name == reference else f" ({results[name][-1].rps / base:.2f})")
        for name in names
    ]
    print(f"round {round_index + 1}: req/s (x {reference}): {' | '.join(cells)}")


@dataclass(frozen=True)
class Verdict:
    """One target (of issues 3 and 11) and how this run did against it."""

    bench: str
    target: str
    measured: str
    passed: bool

    def line(self) -> str:
        return f"{'PASS' if self.passed else 'MISS'}  [{self.bench}] {self.target}: {self.measured}"


def print_verdicts(verdicts: Sequence[Verdict]) -> None:
    for verdict in verdicts:
        print(verdict.line())


@functools.cache
def gateway_origin() -> Path:
    """Where ``python -m gateway`` run from ``GATEWAY_SRC`` imports the package from; a
    BenchError if not from ``GATEWAY_SRC`` (the figures would be another tree's)."""
    done = subprocess.run(
        [sys.executable, "-c", "import gateway; print(gateway.__file__)"],
        cwd=GATEWAY_SRC,
        capture_output=True,
        text=True,
        check=False,
    )
    origin = Path(done.stdout.strip()).parent
    if done.returncode != 0 or not origin.is_relative_to(GATEWAY_SRC):
        raise BenchError(f"gateway is imported from {origin}, not {GATEWAY_SRC}: {done.stderr}")
    return origin


def machine_note() -> str:
    """Cores, pinning and load: the context every figure needs (the CPU line printed under
    each table says whether other processes competed while measuring)."""
    load1, load5, _ = os.getloadavg()
    pinning = (
        f"servers on core {SERVER_CORE}, load generator on core {LOAD_CORE}"
        if SERVER_CORE is not None
        else "one core only: no pinning, servers and load generator share it"
    )
    return (
        f"{os.cpu_count()} cores ({pinning}); load average {load1:.2f} (1 min), {load5:.2f} "
        f"(5 min); gateway code: {gateway_origin()}"
    )


_TICKS_PER_S = os.sysconf("SC_CLK_TCK")


def _machine_busy_ticks() -> int:
    """CPU time spent on anything but idling, all cores, since boot."""
    with open("/proc/stat") as handle:
        fields = [int(n) for n in handle.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields[:8]) - idle


def _our_ticks() -> int:
    """CPU time of this process and every descendant: a live process counts its own time, a
    reaped one is in its parent's ``cutime``/``cstime``, so nothing is counted twice."""
    parents: dict[int, int] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                rest = handle.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(rest[1])
        times[int(entry)] = sum(int(n) for n in rest[11:15])
    ours = {os.getpid()}
    grew = True
    while grew:
        fresh = {pid for pid, parent in parents.items() if parent in ours and pid not in ours}
        ours |= fresh
        grew = bool(fresh)
    return sum(times.get(pid, 0) for pid in ours)


def _others_cores(window_s: float) -> float:
    """Cores used by processes that are not this benchmark over the next ``window_s``."""
    wall, busy, ours = time.monotonic(), _machine_busy_ticks(), _our_ticks()
    time.sleep(window_s)
    spent = (_machine_busy_ticks() - busy) - (_our_ticks() - ours)
    return max(0.0, spent / _TICKS_PER_S / (time.monotonic() - wall))


class QuietWait:
    """Waits for other processes to leave the cores alone before a measurement.

    Before each measurement, ``wait()`` returns once other processes have used under
    ``threshold`` cores for a second, or when the whole budget of ``budget_s``
    seconds (shared by every call) is spent; then it measures anyway.
    """

    def __init__(self, budget_s: float, threshold: float = 0.15) -> None:
        self.budget_s = budget_s
        self.threshold = threshold

    def wait(self) -> None:
        if self.budget_s <= 0:
            return
        started = time.monotonic()
        calm = 0
        others = 0.0
        while calm < 2 and time.monotonic() - started < self.budget_s:
            others = _others_cores(0.5)
            calm = calm + 1 if others < self.threshold else 0
        waited = time.monotonic() - started
        self.budget_s = max(0.0, self.budget_s - waited)
        if calm >= 2:
            if waited > 2.5:
                print(f"(waited {waited:.0f} s for other processes to go quiet)")
        else:
            print(
                f"(other processes still use {others:.2f} cores and the wait budget is spent: "
                "measuring without waiting from now on)"
            )


class CpuMeter:
    """How busy the machine was during a measurement, and how much of it was not us.

    Other processes on the machine (a test run, a build) take cores from the servers and
    the load generator; this says how much, so a noisy figure can be told from a real one.
    """

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._busy = _machine_busy_ticks()
        self._ours = _our_ticks()

    def summary(self) -> str:
        wall = time.monotonic() - self._wall
        busy = (_machine_busy_ticks() - self._busy) / _TICKS_PER_S / wall
        ours = (_our_ticks() - self._ours) / _TICKS_PER_S / wall
        others = max(0.0, busy - ours)
        note = f"CPU while measuring: this benchmark {ours:.2f} cores, other processes {others:.2f}"
        note += f" cores (of {os.cpu_count()})"
        if others > 0.2:
            note += "; the other processes compete for the pinned cores: figures are noisy"
        return note


def run_bench(
    name: str,
    parser: argparse.ArgumentParser,
    run: Callable[[argparse.Namespace], Sequence[Verdict]],
    argv: Sequence[str] | None,
) -> int:
    """A benchmark's ``main``: parse, pin, run, print the verdicts; the exit code says how it
    went (0 every target met, 1 one missed, 2 could not run, 130 interrupted)."""
    args = parser.parse_args(argv)
    install_signal_handlers()
    pin_self_to_load_core()
    try:
        verdicts = run(args)
    except BenchError as exc:
        print(f"bench {name}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"bench {name}: interrupted; every process it started was stopped", file=sys.stderr)
        return 130
    print()
    print_verdicts(verdicts)
    return 0 if all(v.passed for v in verdicts) else 1


class BenchMain(Protocol):
    """A benchmark module's ``main``: its command line (``sys.argv`` if None) to an exit code."""

    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def bench_main(
    name: str,
    parser: Callable[[], argparse.ArgumentParser],
    run: Callable[[argparse.Namespace], Sequence[Verdict]],
) -> BenchMain:
    """A benchmark module's ``main(argv)``: ``run_bench`` with its parser and run."""

    def main(argv: Sequence[str] | None = None) -> int:
        return run_bench(name, parser(), run, argv)

    return main


def positive_int(text: str) -> int:
    """An argparse type: an integer of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text}")
    return value


def bench_parser(name: str, doc: str | None) -> argparse.ArgumentParser:
    """The parser of ``python -m bench NAME``: the module's docstring as its description."""
    return argparse.ArgumentParser(
        prog=f"python -m bench {name}",
        description=doc,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )


def add_quiet_wait(parser: argparse.ArgumentParser) -> None:
    """The ``--quiet-wait`` option every benchmark takes."""
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=15.0,
        help="seconds, in all, to wait for other processes to leave the cores idle before "
        "measuring (0: do not wait; default: 15)",
    )
