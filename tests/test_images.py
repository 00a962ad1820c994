"""``/mj/image/{task_id}`` through the real app on a real port, with real sims whose tasks
point at a local image host (the CDN's stand-in): exact bytes, one fetch however many ask,
signed URLs, visibility, SSRF refusals, conditional and range requests, what is not an image,
sizes, timeouts, the outbound caps, rewriting and rehosting."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from gateway.configfile import config_from_dict
from gateway.images.signing import UrlSigner
from tests.images_support import (
    PUBLIC_URL,
    SECRET_KEY,
    ImageHost,
    image_host,
    images_section,
    png,
    server_section,
    trap,
)
from tests.sims_extra import unique_id
from tests.support import (
    GatewayThread,
    SimProcess,
    caller,
    config_data,
    running_gateway,
    wait_until,
)
from tests.test_observability import sample_sum, scrape


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with image_host() as started:
        yield started


def gateway_config(
    sims: list[SimProcess], directory: Path, *, native_query: bool = False, **images: Any
) -> Any:
    data = config_data(
        sims[:1],
        server=server_section(),
        images=images_section(str(directory), **images),
    )
    data["upstreams"][0]["supports_query"] = native_query
    data["clients"][1]["visibility"] = "own"  # bob sees only the tasks he submitted
    return config_from_dict(data, env={})


def seeded(sim: SimProcess, url: str, **fields: Any) -> str:
    task_id = unique_id()
    sim.seed(id=task_id, imageUrl=url, **fields)
    return task_id


def get_image(gateway: GatewayThread, path: str, **headers: str) -> httpx.Response:
    return httpx.get(f"{gateway.url}{path}", headers={**caller(), **headers}, timeout=20)


def local(url: str, gateway: GatewayThread) -> str:
    """A URL mjgate handed out (under server.public_url), on the test gateway."""
    assert url.startswith(PUBLIC_URL), url
    return gateway.url + url.removeprefix(PUBLIC_URL)


def grown(before: str, after: str, name: str, **labels: str) -> float:
    """How much a metric grew between two scrapes (metrics are per process, not per app)."""
    return sample_sum(after, name, **labels) - sample_sum(before, name, **labels)


def stored_files(directory: Path) -> list[Path]:
    return sorted(directory.glob("??/*.*"))


# --- serving --------------------------------------------------------------------------------


def test_the_exact_bytes_are_served_with_their_headers_then_from_disk(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    data = png(120, 90, seed=1)
    task_id = seeded(sims[0], host.add("exact.png", data))
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        before = scrape(gateway.url)
        first = get_image(gateway, f"/mj/image/{task_id}")
        second = get_image(gateway, f"/mj/image/{task_id}")
        head = httpx.head(f"{gateway.url}/mj/image/{task_id}", headers=caller())
        text = scrape(gateway.url)
    assert first.status_code == second.status_code == 200
    assert first.content == second.content == data
    assert first.headers["content-type"] == "image/png"
    assert first.headers["content-length"] == str(len(data))
    assert first.headers["x-content-type-options"] == "nosniff"
    assert first.headers["cache-control"] == "private, max-age=86400"
    assert (first.headers["x-image-source"], second.headers["x-image-source"]) == ("cdn", "disk")
    assert first.headers["etag"] == second.headers["etag"]
    assert first.headers["last-modified"] == second.headers["last-modified"]
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == str(len(data))
    assert host.hits["/img/exact.png"] == 1
    (file,) = stored_files(tmp_path)
    assert file.read_bytes() == data
    assert grown(before, text, "mjgate_images_served_total", source="cdn") == 1
    assert grown(before, text, "mjgate_images_served_total", source="disk") == 2
    assert grown(before, text, "mjgate_image_bytes_served_total") == 2 * len(data)
    assert grown(before, text, "mjgate_image_fetches_total", outcome="ok") == 1
    assert grown(before, text, "mjgate_image_fetch_duration_seconds_count") == 1
    assert sample_sum(text, "mjgate_image_disk_bytes") == len(data)


def test_one_of_several_images_and_tasks_without_one(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    urls = [host.add(f"grid-{n}.png", png(10, 10, seed=n)) for n in range(2)]
    task_id = seeded(sims[0], urls[0], imageUrls=[{"url": urls[0]}, urls[1]])
    bare = unique_id()
    sims[0].seed(id=bare, status="FAILURE")
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        second = get_image(gateway, f"/mj/image/{task_id}/1")
        beyond = get_image(gateway, f"/mj/image/{task_id}/2")
        not_a_number = get_image(gateway, f"/mj/image/{task_id}/x")
        none = get_image(gateway, f"/mj/image/{bare}")
        unknown = get_image(gateway, "/mj/image/1799999999999999")
        no_key = httpx.get(f"{gateway.url}/mj/image/{task_id}")
    assert second.status_code == 200 and second.content == host.image("grid-1.png")
    assert beyond.status_code == 404 and "has no image 2" in beyond.json()["description"]
    assert not_a_number.status_code == 404
    assert none.status_code == 404
    assert none.json()["description"] == f"task {bare} has no image"
    assert unknown.status_code == 404
    assert no_key.status_code == 401


async def test_many_callers_of_one_uncached_image_cause_one_fetch(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    data = png(200, 200, seed=2)
    url = host.add("popular.png", data)
    task_id = seeded(sims[0], url.replace("/img/", "/slow/") + "?delay=0.2&chunks=3")
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(limits=limits, timeout=30, headers=caller()) as client:
            answers = await asyncio.gather(
                *(client.get(f"{gateway.url}/mj/image/{task_id}") for _ in range(200))
            )
    assert [a.status_code for a in answers] == [200] * 200
    assert all(a.content == data for a in answers)
    assert host.hits["/slow/popular.png"] == 1


# --- signed URLs ----------------------------------------------------------------------------


def signed(task_id: str, n: int | None = None, now: float | None = None) -> str:
    signer = UrlSigner(SECRET_KEY, 86400, "")
    return signer.url(task_id, n, time.time() if now is None else now)


def test_signed_urls_valid_expired_tampered_or_for_another_task(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    task_id = seeded(sims[0], host.add("signed.png", png(16, 16, seed=3)))
    other_id = seeded(sims[0], host.add("other.png", png(16, 16, seed=4)))
    valid = signed(task_id)
    expired = signed(task_id, now=time.time() - 2 * 86400)
    tampered = valid[:-2] + ("AA" if not valid.endswith("AA") else "BB")
    others = signed(other_id).replace(f"/mj/image/{other_id}", f"/mj/image/{task_id}")
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        ok = httpx.get(gateway.url + valid)
        refused = {
            name: httpx.get(gateway.url + path)
            for name, path in (("expired", expired), ("tampered", tampered), ("others", others))
        }
        with_key_and_bad_sig = httpx.get(gateway.url + tampered, headers=caller())
    assert ok.status_code == 200 and ok.content == host.image("signed.png")
    max_age = int(ok.headers["cache-control"].split("max-age=")[1].split(",")[0])
    assert ok.headers["cache-control"].startswith("private, max-age=")
    assert ok.headers["cache-control"].endswith(", immutable")
    assert 86400 - 5 <= max_age <= 86400 + 86400 // 8
    assert refused["expired"].status_code == 403
    assert refused["expired"].json()["description"] == "signed URL expired"
    assert refused["tampered"].status_code == 403
    assert refused["tampered"].json()["description"] == "invalid signature"
    assert refused["others"].status_code == 403
    assert with_key_and_bad_sig.status_code == 403
    assert host.hits["/img/signed.png"] == 1
    assert host.hits["/img/other.png"] == 0


def test_signed_urls_share_the_bucket_the_config_gives_them(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    task_id = seeded(sims[0], host.add("bucket.png", png(8, 8, seed=5)))
    limit = {"rps": 0.01, "burst": 3}
    with running_gateway(gateway_config(sims, tmp_path, signed_rate_limit=limit)) as gateway:
        answers = [httpx.get(gateway.url + signed(task_id)) for _ in range(4)]
        keyed = get_image(gateway, f"/mj/image/{task_id}")
    assert [a.status_code for a in answers] == [200, 200, 200, 429]
    assert answers[0].headers["ratelimit-limit"] == "3"
    assert keyed.status_code == 200  # a caller's key spends from its own bucket


# --- visibility -----------------------------------------------------------------------------


def test_visibility_own_keeps_other_callers_images_out(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    """bob (visibility own) sees the image of the task he submitted, not alice's."""
    url = host.add("visible.png", png(16, 16, seed=5))
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        submits = {}
        for name in ("alice", "bob"):
            answer = httpx.post(
                f"{gateway.url}/mj/submit/imagine",
                json={"prompt": f"a picture by {name}"},
                headers=caller(name),
            )
            assert answer.json()["code"] == 1, answer.text
            submits[name] = answer.json()["result"]
            sims[0].seed(id=submits[name], imageUrl=url)  # finished, with our image
        own = get_image(gateway, f"/mj/image/{submits['bob']}", **caller("bob"))
        others = get_image(gateway, f"/mj/image/{submits['alice']}", **caller("bob"))
        alice = get_image(gateway, f"/mj/image/{submits['bob']}", **caller("alice"))
    assert own.status_code == 200 and own.content == host.image("visible.png")
    assert others.status_code == 404
    assert others.json()["description"] == f"task {submits['alice']} not found"
    assert alice.status_code == 200


# --- fetching safely ------------------------------------------------------------------------


def test_ssrf_cases_are_refused_without_a_connection(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    with trap() as listener:
        port = listener.port
        not_allowed = seeded(sims[0], f"http://localhost:{port}/a.png")
        redirected = seeded(sims[0], f"{host.url}/redirect?to=http://localhost:{port}/a.png")
        metadata = seeded(
            sims[0], f"{host.url}/redirect?to=http://169.254.169.254/latest/meta-data/"
        )
        literal = seeded(sims[0], f"http://[::1]:{port}/a.png")
        decimal = seeded(sims[0], f"http://2130706433:{port}/a.png")
        mapped = seeded(sims[0], f"http://[::ffff:127.0.0.1]:{port}/a.png")
        scheme = seeded(sims[0], "file:///etc/passwd")
        exact = gateway_config(sims, tmp_path / "exact")
        wildcard = gateway_config(sims, tmp_path / "wild", allowed_hosts=["127.0.0.1", "*"])
        answers: dict[str, httpx.Response] = {}
        with running_gateway(exact) as gateway:
            for name, task_id in (("not allowed", not_allowed), ("scheme", scheme)):
                answers[name] = get_image(gateway, f"/mj/image/{task_id}")
        with running_gateway(wildcard) as gateway:
            before = scrape(gateway.url)
            for name, task_id in (
                ("loopback name", not_allowed),
                ("redirect", redirected),
                ("metadata", metadata),
                ("ipv6 literal", literal),
                ("decimal address", decimal),
                ("mapped address", mapped),
            ):
                answers[name] = get_image(gateway, f"/mj/image/{task_id}")
            text = scrape(gateway.url)
        assert listener.connections == 0
    for name, answer in answers.items():
        assert answer.status_code == 502, (name, answer.text)
        assert answer.json()["description"].startswith("refused to fetch the image"), name
    assert host.hits["/redirect"] == 2
    assert grown(before, text, "mjgate_image_fetches_total", outcome="refused") == 6
    assert stored_files(tmp_path / "wild") == []


def test_what_is_not_an_image_is_refused_and_never_stored(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    html = seeded(sims[0], f"{host.url}/html.png")
    fake = seeded(sims[0], f"{host.url}/fake.png")
    big = seeded(sims[0], f"{host.url}/big.png")
    big_chunked = seeded(sims[0], f"{host.url}/big-chunked.png")
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        before = scrape(gateway.url)
        answers = {t: get_image(gateway, f"/mj/image/{t}") for t in (html, fake, big, big_chunked)}
        text = scrape(gateway.url)
    assert answers[html].status_code == 502
    assert answers[html].json()["description"] == "the image host answered text/html, not an image"
    assert answers[fake].status_code == 502
    assert "not a PNG, JPEG, GIF, WebP or AVIF" in answers[fake].json()["description"]
    for task_id in (big, big_chunked):
        assert answers[task_id].status_code == 502
        assert "larger than images.max_bytes" in answers[task_id].json()["description"]
    assert grown(before, text, "mjgate_image_fetches_total", outcome="not_image") == 2
    assert grown(before, text, "mjgate_image_fetches_total", outcome="too_large") == 2
    assert stored_files(tmp_path) == []
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_slow_host_times_out_and_an_expired_link_is_gone(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    host.add("slow.png", png(64, 64, seed=6))
    slow = seeded(sims[0], f"{host.url}/slow/slow.png?delay=0.4&chunks=4")
    gone = seeded(sims[0], f"{host.url}/exp/gone.png?ex={int(time.time()) - 10:x}")
    with running_gateway(gateway_config(sims, tmp_path, timeout_s=0.5)) as gateway:
        started = time.monotonic()
        timed_out = get_image(gateway, f"/mj/image/{slow}")
        elapsed = time.monotonic() - started
        expired = get_image(gateway, f"/mj/image/{gone}")
    assert timed_out.status_code == 504 and elapsed < 2
    assert expired.status_code == 404
    assert "gone from its host" in expired.json()["description"]


def test_an_image_on_an_upstreams_host_waits_for_its_outbound_caps(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    """The image host is also an upstream here, allowed one request at a time: while one
    slow image is being fetched, another waits for the cap and gives up after its queue
    timeout."""
    host.add("capped-a.png", png(64, 64, seed=7))
    host.add("capped-b.png", png(64, 64, seed=7))
    first = seeded(sims[0], f"{host.url}/slow/capped-a.png?delay=0.5&chunks=3")
    second = seeded(sims[0], f"{host.url}/slow/capped-b.png?delay=0.5&chunks=3")
    data = config_data(sims[:1], images=images_section(str(tmp_path)))
    data["upstreams"].append(
        {
            "name": "cdn",
            "base_url": host.url,
            "key": "cdn-key-0123456789",
            "weight": 0,
            "max_concurrency": 1,
            "queue_timeout_s": 0.3,
        }
    )
    config = config_from_dict(data, env={})

    async def both(gateway: GatewayThread) -> list[httpx.Response]:
        async with httpx.AsyncClient(headers=caller(), timeout=20) as client:
            one = asyncio.ensure_future(client.get(f"{gateway.url}/mj/image/{first}"))
            await asyncio.sleep(0.3)
            two = await client.get(f"{gateway.url}/mj/image/{second}")
            return [await one, two]

    # Teach the gateway both owners first: the tasks' lookups must not use the cap.
    with running_gateway(config) as gateway:
        for task_id in (first, second):
            assert (
                httpx.get(f"{gateway.url}/mj/task/{task_id}/fetch", headers=caller()).status_code
                == 200
            )
        one, two = asyncio.run(both(gateway))
    # One holds the only slot for its whole slow fetch; the other gives up waiting for it.
    done, refused = sorted((one, two), key=lambda answer: answer.status_code)
    assert (done.status_code, refused.status_code) == (200, 503)
    assert refused.json()["description"] == "the upstream's outbound caps are full"


# --- conditional and range requests ---------------------------------------------------------


def test_etag_and_last_modified_answer_304_and_ranges_206(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    data = png(100, 100, seed=8)
    task_id = seeded(sims[0], host.add("ranges.png", data))
    path = f"/mj/image/{task_id}"
    with running_gateway(gateway_config(sims, tmp_path)) as gateway:
        full = get_image(gateway, path)
        etag, modified = full.headers["etag"], full.headers["last-modified"]
        by_etag = get_image(gateway, path, **{"If-None-Match": f'W/"x", {etag}'})
        by_date = get_image(gateway, path, **{"If-Modified-Since": modified})
        changed = get_image(gateway, path, **{"If-None-Match": '"something-else"'})
        head = get_image(gateway, path, Range="bytes=0-99")
        tail = get_image(gateway, path, Range="bytes=-100")
        if_range = get_image(gateway, path, Range="bytes=10-19", **{"If-Range": etag})
        stale_range = get_image(gateway, path, Range="bytes=10-19", **{"If-Range": '"old"'})
        beyond = get_image(gateway, path, Range=f"bytes={len(data) + 5}-")
    assert by_etag.status_code == by_date.status_code == 304
    assert by_etag.content == b"" and by_etag.headers["etag"] == etag
    assert changed.status_code == 200 and changed.content == data
    assert head.status_code == 206 and head.content == data[:100]
    assert head.headers["content-range"] == f"bytes 0-99/{len(data)}"
    assert tail.status_code == 206 and tail.content == data[-100:]
    assert if_range.status_code == 206 and if_range.content == data[10:20]
    assert stale_range.status_code == 200 and stale_range.content == data
    assert beyond.status_code == 416
    assert host.hits["/img/ranges.png"] == 1


# --- rewriting ------------------------------------------------------------------------------


def test_rewrite_on_fetch_list_and_query_serves_bytes_out(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    url = host.add("rewritten.png", png(24, 24, seed=9))
    task_id = seeded(sims[0], url)
    listed_id = seeded(sims[0], url)
    queried_id = seeded(sims[0], url, prompt="rewrite query marker")
    config = gateway_config(sims, tmp_path, native_query=True, rewrite=True)
    with running_gateway(config) as gateway, httpx.Client(headers=caller()) as client:
        first = client.get(f"{gateway.url}/mj/task/{task_id}/fetch")
        again = client.get(f"{gateway.url}/mj/task/{task_id}/fetch")
        listed = client.post(
            f"{gateway.url}/mj/task/list-by-condition", json={"ids": [listed_id, task_id]}
        )
        queried = client.post(
            f"{gateway.url}/mj/task/query", json={"prompt": "rewrite query marker"}
        )
        recent = client.get(f"{gateway.url}/mj/task/list")
        images = [
            httpx.get(local(link, gateway))
            for link in (
                first.json()["imageUrl"],
                listed.json()[0]["imageUrl"],
                queried.json()["content"][0]["imageUrl"],
            )
        ]
    task = first.json()
    assert task["imageUrl"].startswith(f"{PUBLIC_URL}/mj/image/{task_id}?exp=")
    assert task["properties"]["originalImageUrl"] == url
    assert task["properties"]["finalPrompt"]  # the upstream's own properties are kept
    assert again.headers["x-cache"] == "HIT" and again.content == first.content
    assert [t["id"] for t in listed.json()] == [listed_id, task_id]
    assert listed.json()[1] == task
    assert listed.json()[0]["properties"]["originalImageUrl"] == url
    (row,) = queried.json()["content"]
    assert row["id"] == queried_id and row["imageUrl"].startswith(f"{PUBLIC_URL}/mj/image/")
    rows = {t["id"]: t for t in recent.json()}
    assert rows[queried_id]["imageUrl"].startswith(f"{PUBLIC_URL}/mj/image/{queried_id}?exp=")
    assert all(image.status_code == 200 for image in images)
    assert all(image.content == host.image("rewritten.png") for image in images)


# --- rehosting ------------------------------------------------------------------------------


def test_rehost_serves_the_image_after_its_link_expired_at_the_host(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    host.add("kept.png", png(40, 40, seed=10))
    host.add("lost.png", png(40, 40, seed=11))
    rehosting = gateway_config(sims, tmp_path / "rehost", rehost=True)
    with running_gateway(rehosting) as gateway, httpx.Client(headers=caller()) as client:
        expiry = int(time.time()) + 3
        kept = seeded(sims[0], f"{host.url}/exp/kept.png?ex={expiry:x}")
        lost = seeded(sims[0], f"{host.url}/exp/lost.png?ex={expiry:x}")
        before = scrape(gateway.url)
        assert client.get(f"{gateway.url}/mj/task/{kept}/fetch").status_code == 200
        wait_until(lambda: stored_files(tmp_path / "rehost"), what="the rehosted image")
        time.sleep(max(expiry - time.time(), 0) + 0.2)
        image = client.get(f"{gateway.url}/mj/image/{kept}")
        task = client.get(f"{gateway.url}/mj/task/{kept}/fetch")
        text = scrape(gateway.url)
    plain = gateway_config(sims, tmp_path / "plain")
    with running_gateway(plain) as gateway, httpx.Client(headers=caller()) as client:
        assert client.get(f"{gateway.url}/mj/task/{lost}/fetch").headers["x-cache"] == "MISS"
        too_late = client.get(f"{gateway.url}/mj/image/{lost}")
    assert image.status_code == 200 and image.content == host.image("kept.png")
    assert image.headers["x-image-source"] == "disk"
    assert host.hits["/exp/kept.png"] == 1
    # The answer outlived its link's expiry (minus the 300 s margin): no cap for a kept image.
    assert task.headers["x-cache"] == "HIT"
    assert grown(before, text, "mjgate_images_rehosted_total") == 1
    assert too_late.status_code == 404


def test_a_failed_rehost_drops_the_cached_answer(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    """The answer was cached past its link on the promise of a copy; no copy, no answer."""
    task_id = seeded(sims[0], f"{host.url}/html.png")
    fetch = f"/mj/task/{task_id}/fetch"
    config = gateway_config(sims, tmp_path, rehost=True)
    tried = host.hits["/html.png"]
    with running_gateway(config) as gateway, httpx.Client(headers=caller()) as client:
        assert client.get(f"{gateway.url}{fetch}").headers["x-cache"] == "MISS"
        wait_until(lambda: host.hits["/html.png"] == tried + 1, what="the rehost attempt")
        time.sleep(0.3)
        again = client.get(f"{gateway.url}{fetch}")
    assert again.headers["x-cache"] == "MISS"
    assert host.hits["/html.png"] == tried + 1  # not tried again at once
