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

from bench.common import (
    CLIENT_KEY,
    CpuMeter,
    Processes,
    QuietWait,
    Verdict,
    WrkResult,
    add_quiet_wait,
    add_wrk_options,
    alternating,
    bench_main,
    bench_parser,
    caller_headers,
    fetch_twice,
    gateway_config,
    machine_note,
    median,
    need,
    print_round,
    print_table,
    ratios,
    start_gateway,
    start_nginx,
    start_redis,
    start_sim,
    wrk_note,
    wrk_runs,
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


def start_image_nginx(procs: Processes, data: bytes) -> tuple[str, Path]:
    """nginx in the foreground, one worker; the URL it serves the image at for the gateway
    (the CDN) and the log of those fetches."""
    for folder in ("www/cdn", "www/static"):
        (procs.workdir / "nginx" / folder).mkdir(parents=True)
        (procs.workdir / "nginx" / folder / "image.png").write_bytes(data)
    values = {"@CLIENT_KEY@": CLIENT_KEY}
    origin, directory = start_nginx(procs, NGINX_CONF, values, "/static/image.png")
    return origin, directory / "cdn.log"


def cdn_fetches(log: Path) -> int:
    return sum(1 for _ in log.open()) if log.exists() else 0


def warm(target: Target, expected: bytes) -> str:
    """Fetch twice; check the bytes; where the second answer came from."""
    response = fetch_twice(target.name, target.url, target.headers, expected, "the image")
    source: str = response.headers.get("x-image-source", "-")
    return source


def run(args: argparse.Namespace) -> list[Verdict]:
    need("wrk", "nginx", "redis-server")
    print(f"== a cached {IMAGE_BYTES // 1024} KiB image: GET /mj/image/{{id}} ({NAME})")
    print(machine_note())
    data = image(IMAGE_BYTES)
    with Processes() as procs:
        redis_url = start_redis(procs)
        origin, cdn_log = start_image_nginx(procs, data)
        sim = start_sim(procs, "main")
        sim.seed({"id": TASK_ID, "status": "SUCCESS", "imageUrl": f"{origin}/cdn/image.png"})
        config = gateway_config([sim], redis_url)
        config["server"]["secret_key"] = SECRET_KEY
        config["images"] = {
            "enabled": True,
            "allowed_hosts": ["127.0.0.1"],
            "dir": str(procs.workdir / "images"),
            # As the caller's own limit: exercised, never refusing at the benchmark's rate.
            "signed_rate_limit": config["clients"][0]["rate_limit"],
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
        print(wrk_note(args))
        results: dict[str, list[WrkResult]] = {t.name: [] for t in targets}
        calm = QuietWait(args.quiet_wait)
        meter = CpuMeter()
        for round_index in range(args.rounds):
            for target in alternating(targets, round_index):
                calm.wait()
                results[target.name].append(wrk_runs(target.url, target.headers, args)[-1])
            print_round(round_index, [t.name for t in targets], results, "nginx")
        print(meter.summary())
        refetched = cdn_fetches(cdn_log) - fetched
        return report(targets, results, served, refetched)


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
    p = bench_parser(NAME, __doc__)
    add_wrk_options(p, connections=16, rounds=4)
    add_quiet_wait(p)
    return p


main = bench_main(NAME, parser, run)


if __name__ == "__main__":
    sys.exit(main())
