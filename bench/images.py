"""A cached 1 MB image: mjgate's ``/mj/image/{id}`` against nginx serving the same file.

One run, one machine, same wrk settings for every target, in rounds of alternating order
(the per-round ratio cancels the machine's drift; the median of those ratios is the figure):

- ``nginx``: nginx (one worker, ``sendfile on``) serving the file from disk behind the same
  caller-key check mjgate makes, as cheaply as nginx can make it;
- ``mjgate``: ``python -m gateway serve`` configured like production (Redis, a real client key
  with a rate limit, metrics, JSON access log to a file), the image already on its disk cache:
  each request is a key check, a rate-limit call to Redis, an L1 task hit and a
  ``FileResponse`` of the stored file;
- ``mjgate-signed``: the same image by its signed URL (``?exp=&sig=``: no key, no Redis).

nginx is also the image's host (the CDN): mjgate fetches the image from it once, before
measuring. No target is set by the issue: the ratio is reported, and the run fails only if
an answer was wrong or mjgate fetched the image again under load.
Needs: wrk, nginx, redis-server on PATH (apt-get install -y wrk nginx redis-server).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.common import (
    CLIENT_KEY,
    SERVER_CORE,
    BenchError,
    CpuMeter,
    Processes,
    QuietWait,
    Verdict,
    WrkResult,
    add_quiet_wait,
    caller_headers,
    free_port,
    gateway_config,
    machine_note,
    median,
    need,
    positive_int,
    print_table,
    run_bench,
    run_wrk,
    start_gateway,
    start_redis,
    start_sim,
    wait_http,
)
from gateway.images.signing import UrlSigner

__all__ = ["main", "run"]

NAME = "images"
TASK_ID = "1715000000000888"
IMAGE_BYTES = 1024 * 1024
SECRET_KEY = "bench-image-url-secret-0123456789abcdef"

NGINX_CONF = """\
@USER@
daemon off;
worker_processes 1;
pid @DIR@/nginx.pid;
error_log @DIR@/error.log warn;
events { worker_connections 1024; }
http {
    access_log off;
    client_body_temp_path @DIR@/client_body;
    proxy_temp_path @DIR@/proxy_temp;
    fastcgi_temp_path @DIR@/fastcgi_temp;
    uwsgi_temp_path @DIR@/uwsgi_temp;
    scgi_temp_path @DIR@/scgi_temp;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    types { image/png png; }
    server {
        listen 127.0.0.1:@PORT@;
        root @DIR@/www;
        # The image's host, as mjgate sees it: every fetch is logged, and counted.
        location /cdn/ { access_log @DIR@/cdn.log; }
        location /static/ {
            if ($http_authorization != "Bearer @CLIENT_KEY@") { return 401; }
            add_header Cache-Control "private, max-age=86400";
        }
    }
}
"""


@dataclass(frozen=True)
class Target:
    name: str
    url: str
    headers: dict[str, str]
    what: str


def image(size: int) -> bytes:
    """A PNG signature and random bytes: the size of a real upscale, incompressible."""
    signature = b"\x89PNG\r\n\x1a\n"
    return signature + os.urandom(size - len(signature))


def start_nginx(procs: Processes, data: bytes) -> tuple[str, Path]:
    """nginx in the foreground, one worker; the URL it serves the image at for the gateway
    (the CDN) and the log of those fetches."""
    binary = need("nginx")["nginx"]
    directory = procs.workdir / "nginx"
    for folder in ("www/cdn", "www/static"):
        (directory / folder).mkdir(parents=True)
        (directory / folder / "image.png").write_bytes(data)
    port = free_port()
    text = NGINX_CONF
    # As root the worker would switch to "nobody" and lose access to the temporary directory.
    user = "user root;" if os.geteuid() == 0 else ""
    for placeholder, value in {
        "@USER@": user,
        "@DIR@": str(directory),
        "@PORT@": str(port),
        "@CLIENT_KEY@": CLIENT_KEY,
    }.items():
        text = text.replace(placeholder, value)
    config = directory / "nginx.conf"
    config.write_text(text)
    log = directory / "error.log"
    args = [binary, "-p", str(directory), "-c", str(config), "-e", str(log)]
    proc = procs.start("nginx", args, core=SERVER_CORE, stdout=log, stderr=log)
    origin = f"http://127.0.0.1:{port}"
    wait_http(f"{origin}/static/image.png", proc, "nginx", log=log, headers=caller_headers())
    return origin, directory / "cdn.log"


def cdn_fetches(log: Path) -> int:
    return sum(1 for _ in log.open()) if log.exists() else 0


def warm(target: Target, expected: bytes) -> str:
    """Fetch twice; check the bytes; where the second answer came from."""
    with httpx.Client(headers=target.headers, timeout=10) as client:
        client.get(target.url)
        response = client.get(target.url)
    if response.status_code != 200 or response.content != expected:
        raise BenchError(
            f"{target.name} answered {response.status_code} with other bytes than the image "
            f"({len(response.content)} vs {len(expected)} bytes)"
        )
    source: str = response.headers.get("x-image-source", "-")
    return source


def run(args: argparse.Namespace) -> list[Verdict]:
    need("wrk", "nginx", "redis-server")
    print(f"== a cached {IMAGE_BYTES // 1024} KiB image: GET /mj/image/{{id}} ({NAME})")
    print(machine_note())
    data = image(IMAGE_BYTES)
    with Processes() as procs:
        redis_url = start_redis(procs)
        origin, cdn_log = start_nginx(procs, data)
        sim = start_sim(procs, "main")
        sim.seed({"id": TASK_ID, "status": "SUCCESS", "imageUrl": f"{origin}/cdn/image.png"})
        config = gateway_config([sim], redis_url)
        config["server"]["secret_key"] = SECRET_KEY
        config["images"] = {
            "enabled": True,
            "allowed_hosts": ["127.0.0.1"],
            "dir": str(procs.workdir / "images"),
        }
        gateway = start_gateway(procs, "mjgate", config)
        signed = UrlSigner(SECRET_KEY, 86400, gateway.url).url(TASK_ID, None, time.time())
        targets = [
            Target("nginx", f"{origin}/static/image.png", caller_headers(), "sendfile, 1 worker"),
            Target(
                "mjgate",
                f"{gateway.url}/mj/image/{TASK_ID}",
                caller_headers(),
                "key, rate limit (Redis), L1 task hit, FileResponse",
            ),
            Target("mjgate-signed", signed, {}, "signed URL: no key, no Redis"),
        ]
        served = {target.name: warm(target, data) for target in targets}
        fetched = cdn_fetches(cdn_log)
        print(
            f"image: {len(data):,} bytes, fetched by mjgate from its host {fetched} time(s) "
            f"while warming; {gateway.metrics_state()}"
        )
        print(
            f"wrk -t{args.threads} -c{args.connections} -d{args.duration:g}s --latency "
            f"(after a {args.warmup:g} s warm-up run), {args.rounds} rounds in alternating order"
        )
        results: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        calm = QuietWait(args.quiet_wait)
        meter = CpuMeter()
        for round_index in range(args.rounds):
            for target in targets if round_index % 2 == 0 else targets[::-1]:
                calm.wait()
                runs = [args.warmup, args.duration] if args.warmup > 0 else [args.duration]
                for duration in runs:
                    result = run_wrk(
                        target.url,
                        headers=target.headers,
                        duration_s=duration,
                        connections=args.connections,
                        threads=args.threads,
                    )
                results[target.name].append(result)
            print_round(round_index, targets, results)
        print(meter.summary())
        refetched = cdn_fetches(cdn_log) - fetched
        return report(targets, results, served, refetched)


def ratios(results: dict[str, list[WrkResult]], name: str, reference: str) -> list[float]:
    pairs = zip(results[name], results[reference], strict=True)
    return [mine.rps / theirs.rps for mine, theirs in pairs]


def print_round(
    round_index: int, targets: Sequence[Target], results: dict[str, list[WrkResult]]
) -> None:
    nginx = results["nginx"][-1].rps
    cells = [
        f"{t.name} {results[t.name][-1].rps:,.0f}"
        + ("" if t.name == "nginx" else f" ({results[t.name][-1].rps / nginx:.2f})")
        for t in targets
    ]
    print(f"round {round_index + 1}: req/s (x nginx): {' | '.join(cells)}")


def report(
    targets: Sequence[Target],
    results: dict[str, list[WrkResult]],
    served: dict[str, str],
    refetched: int,
) -> list[Verdict]:
    rows = []
    for target in targets:
        runs = results[target.name]
        rps = median([r.rps for r in runs])
        rows.append(
            [
                target.name,
                f"{rps:,.0f}",
                f"{rps * IMAGE_BYTES / 1e9:.2f}",
                f"{median([r.p50_ms for r in runs]):.2f}",
                f"{median([r.p99_ms for r in runs]):.2f}",
                f"{median(ratios(results, target.name, 'nginx')):.2f}",
                str(sum(r.bad_responses for r in runs)),
                served[target.name],
            ]
        )
    print()
    print_table(
        ["target", "req/s", "GB/s", "p50 ms", "p99 ms", "x nginx", "errors", "source"], rows
    )
    print("  req/s, p50, p99: medians over the rounds; x nginx: median per-round ratio")
    for target in targets:
        print(f"  {target.name}: {target.what}")
    keyed = median(ratios(results, "mjgate", "nginx"))
    signed = median(ratios(results, "mjgate-signed", "nginx"))
    print()
    print(f"mjgate / nginx = {keyed:.2f} (with a key); {signed:.2f} (signed URL)")
    print(f"image fetches from its host while under load: {refetched}")
    errors = sum(r.bad_responses for name in ("mjgate", "mjgate-signed") for r in results[name])
    measured = f"{keyed:.2f}x nginx with a key, {signed:.2f}x by signed URL"
    if errors or refetched:
        measured += f"; {errors} failed requests, {refetched} fetches from the host"
    goal = "a cached image served from disk, every answer right (the ratio is reported)"
    return [Verdict(NAME, goal, measured, errors == 0 and refetched == 0)]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m bench images",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--duration", type=float, default=5.0, help="seconds per measured wrk run")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds of wrk warm-up per run")
    p.add_argument("--connections", type=int, default=16, help="wrk connections")
    p.add_argument("--threads", type=int, default=1, help="wrk threads")
    p.add_argument("--rounds", type=positive_int, default=4, help="rounds over all targets")
    add_quiet_wait(p)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    return run_bench(NAME, parser(), run, argv)


if __name__ == "__main__":
    sys.exit(main())
