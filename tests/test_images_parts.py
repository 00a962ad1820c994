"""The image proxy's parts on their own: signed URLs, the host policy and its resolver, image
sniffing, link rewriting, the disk store, the cache hook, and the ``images:`` config."""

from __future__ import annotations

import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
from aiohttp.abc import AbstractResolver, ResolveResult
from yarl import URL

from gateway.cache import TaskCache
from gateway.config import CacheConfig, ConfigError, ImagesConfig, S3Config
from gateway.configfile import config_from_dict
from gateway.images.diskstore import DiskStore
from gateway.images.fetch import sniff
from gateway.images.hosts import GuardedResolver, HostPolicy, Refused, is_public
from gateway.images.links import LinkRewriter, original_links, source_link
from gateway.images.signing import UrlSigner, signed_expiry
from gateway.owners import OwnerMap
from gateway.store import KeySpace, MemoryStore
from tests.images_support import png
from tests.test_config import EXAMPLE, document, only_problem

SECRET = "a-signing-secret-of-thirty-two-chars!"
NOW = 1_800_000_000.0

# --- signed URLs ----------------------------------------------------------------------------


def signed_parts(url: str) -> tuple[str, str]:
    query = URL(url).query
    return query["exp"], query["sig"]


def test_a_signed_url_is_valid_for_its_task_until_it_expires() -> None:
    signer = UrlSigner(SECRET, 3600, "https://gw.example.com")
    url = signer.url("1700000000000001", None, NOW)
    assert url.startswith("https://gw.example.com/mj/image/1700000000000001?exp=")
    exp, sig = signed_parts(url)
    assert NOW + 3600 <= int(exp) < NOW + 3600 + 3600 // 8 + 1
    assert signer.check("1700000000000001", None, exp, sig, NOW) is None
    assert signed_expiry(url) == int(exp)
    assert signer.check("1700000000000001", None, exp, sig, int(exp)) == "signed URL expired"


def test_a_signed_url_is_refused_for_another_task_image_or_key() -> None:
    signer = UrlSigner(SECRET, 3600, "")
    exp, sig = signed_parts(signer.url("1700000000000001", None, NOW))
    assert signer.check("1700000000000002", None, exp, sig, NOW) == "invalid signature"
    assert signer.check("1700000000000001", 0, exp, sig, NOW) == "invalid signature"
    tampered = sig[:-1] + ("A" if sig[-1] != "A" else "B")
    assert signer.check("1700000000000001", None, exp, tampered, NOW) == "invalid signature"
    later = str(int(exp) + 3600)
    assert signer.check("1700000000000001", None, later, sig, NOW) == "invalid signature"
    other_key = UrlSigner(SECRET + "x", 3600, "")
    assert other_key.check("1700000000000001", None, exp, sig, NOW) == "invalid signature"
    for bad in ("", "12e5", "-1", "9" * 13):
        assert signer.check("1700000000000001", None, bad, sig, NOW) == "malformed signed URL"


def test_signed_urls_are_stable_within_a_step() -> None:
    """Answers a few seconds apart carry the same URL: a browser downloads the image once."""
    signer = UrlSigner(SECRET, 86400, "")
    step = 86400 // 8
    start = (int(NOW) // step) * step
    urls = {signer.url("1700000000000001", 2, start + offset) for offset in (1, 60, step - 1)}
    assert len(urls) == 1
    assert signer.url("1700000000000001", 2, start + step + 1) not in urls


# --- the host policy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("8.8.8.8", True),
        ("2606:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.1.1", False),
        ("100.64.0.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1%eth0", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:8.8.8.8", True),
        ("not an address", False),
    ],
)
def test_is_public(address: str, public: bool) -> None:
    assert is_public(address) is public


def test_the_policy_allows_exact_hosts_wildcards_and_upstream_hosts() -> None:
    policy = HostPolicy(["cdn.example.com", "*.discordapp.net", "10.0.0.5"], ["mj.internal"])
    assert policy.allows("CDN.example.com.") and policy.trusted("cdn.example.com")
    assert policy.allows("media.discordapp.net") and not policy.trusted("media.discordapp.net")
    assert not policy.allows("discordapp.net.evil.com") and not policy.allows("evil.com")
    assert policy.allows("mj.internal") and policy.trusted("mj.internal")
    policy.check(URL("http://10.0.0.5/a.png"))  # listed exactly: may be private
    everything = HostPolicy(["*"], [])
    assert everything.allows("anything.example") and not everything.trusted("anything.example")


@pytest.mark.parametrize(
    "url",
    [
        "ftp://cdn.example.com/a.png",
        "file:///etc/passwd",
        "http://user:pw@cdn.example.com/a.png",
        "http://evil.example/a.png",
        "http://127.0.0.1/a.png",
        "http://[::1]/a.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/a.png",
    ],
)
def test_the_policy_refuses(url: str) -> None:
    policy = HostPolicy(["cdn.example.com", "*"], [])
    if "evil" in url:
        policy = HostPolicy(["cdn.example.com"], [])
    with pytest.raises(Refused):
        policy.check(URL(url))


class FixedResolver(AbstractResolver):
    def __init__(self, addresses: list[str]) -> None:
        self.addresses = addresses

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        return [
            ResolveResult(hostname=host, host=a, port=port, family=family, proto=0, flags=0)
            for a in self.addresses
        ]

    async def close(self) -> None:
        return None


async def test_the_resolver_keeps_public_addresses_of_hosts_not_trusted() -> None:
    policy = HostPolicy(["*", "trusted.example"], [])
    mixed = GuardedResolver(policy, FixedResolver(["10.0.0.1", "93.184.216.34"]))
    assert [r["host"] for r in await mixed.resolve("a.example", 80)] == ["93.184.216.34"]
    rebound = GuardedResolver(policy, FixedResolver(["127.0.0.1", "169.254.169.254"]))
    with pytest.raises(Refused):
        await rebound.resolve("a.example", 80)
    assert len(await rebound.resolve("trusted.example", 80)) == 2


# --- what is an image -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "content_type"),
    [
        (png(2, 2)[:16], "image/png"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01", "image/jpeg"),
        (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00", "image/gif"),
        (b"RIFF\x24\x00\x00\x00WEBPVP8 ", "image/webp"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "image/avif"),
        (b"<html><body>hi</body></html>", None),
        (b'<svg xmlns="http://www.w3.org/2000/svg">', None),
        (b"", None),
    ],
)
def test_sniff(head: bytes, content_type: str | None) -> None:
    assert sniff(head) == content_type


# --- task links -----------------------------------------------------------------------------


def test_rewriting_points_links_at_mjgate_and_keeps_the_originals() -> None:
    rewriter = LinkRewriter(UrlSigner(SECRET, 3600, "https://gw.example.com"))
    task: dict[str, Any] = {
        "id": "1700000000000001",
        "imageUrl": "https://cdn.discordapp.com/a.png?ex=1",
        "imageUrls": [{"url": "https://cdn.example.com/0.png"}, "https://cdn.example.com/1.png"],
        "properties": None,
    }
    assert rewriter.rewrite(task, NOW)
    assert task["imageUrl"].startswith("https://gw.example.com/mj/image/1700000000000001?exp=")
    assert task["imageUrls"][0]["url"].startswith("https://gw.example.com/mj/image/17")
    assert "/1700000000000001/1?exp=" in task["imageUrls"][1]
    assert task["properties"]["originalImageUrl"] == "https://cdn.discordapp.com/a.png?ex=1"
    assert original_links(task) == [
        (None, "https://cdn.discordapp.com/a.png?ex=1"),
        (0, "https://cdn.example.com/0.png"),
        (1, "https://cdn.example.com/1.png"),
    ]
    assert source_link(task, 1) == "https://cdn.example.com/1.png"
    assert source_link(task, 2) is None
    before = dict(task)
    assert not rewriter.rewrite(task, NOW + 60)  # already ours: nothing changes
    assert task == before


def test_rewriting_leaves_tasks_without_images_alone() -> None:
    rewriter = LinkRewriter(UrlSigner(SECRET, 3600, "https://gw.example.com"))
    for task in ({"id": "1700000000000001", "imageUrl": ""}, {"id": "bad id!", "imageUrl": "x"}):
        copy = dict(task)
        assert not rewriter.rewrite(copy, NOW)
        assert copy == task


# --- the disk store -------------------------------------------------------------------------


def stored(store: DiskStore, key: str, data: bytes) -> None:
    temp, out = store.temp()
    out.write(data)
    store.commit(temp, out, key, "image/png")


def test_the_disk_store_keeps_images_and_finds_them_after_a_restart(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10_000)
    store.open()
    stored(store, "ab" + "0" * 38, b"\x89PNG-one")
    found = store.get("ab" + "0" * 38)
    assert found is not None and found.path.read_bytes() == b"\x89PNG-one"
    assert found.content_type == "image/png" and found.path.parent.name == "ab"
    assert store.get("cd" + "0" * 38) is None
    again = DiskStore(tmp_path, 10_000)  # another worker, or the next start
    again.open()
    assert again.used() == len(b"\x89PNG-one")
    assert again.get("ab" + "0" * 38) is not None


def test_eviction_keeps_the_disk_under_its_bound_least_recently_served_first(
    tmp_path: Path,
) -> None:
    store = DiskStore(tmp_path, 1000)
    store.open()
    keys = [f"{i:02d}" + "0" * 38 for i in range(12)]
    for index, key in enumerate(keys):
        stored(store, key, bytes(100))
        if index == 0:  # served after all the others were stored: the most recently served
            first = tmp_path / "00" / f"{key}.png"
            os.utime(first, ns=(time.time_ns() + 10**12, first.stat().st_mtime_ns))
        on_disk = sum(p.stat().st_size for p in tmp_path.glob("??/*.png"))
        assert on_disk == store.used() <= 1000
    assert store.get(keys[0]) is not None
    assert store.get(keys[1]) is None  # the least recently served went first
    assert store.get(keys[-1]) is not None


def test_unfinished_downloads_are_never_found(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, 10_000)
    store.open()
    temp, out = store.temp()
    out.write(b"\x89PNG-half")
    out.flush()
    assert temp.parent == tmp_path / "tmp"
    assert store.get("ab" + "0" * 38) is None
    store.discard(temp, out)
    assert not temp.exists()


def test_stale_temporary_files_are_removed_at_open(tmp_path: Path) -> None:
    (tmp_path / "tmp").mkdir()
    stale, fresh = tmp_path / "tmp" / "old.part", tmp_path / "tmp" / "new.part"
    stale.write_bytes(b"left by a crash")
    fresh.write_bytes(b"another worker's download")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    DiskStore(tmp_path, 10_000).open()
    assert not stale.exists() and fresh.exists()


# --- the cache hook -------------------------------------------------------------------------


class Hook:
    def __init__(self, expires: int | None) -> None:
        self.expires = expires
        self.admitted: list[tuple[str, str]] = []

    def rewrite(self, task: dict[str, Any]) -> bool:
        task["imageUrl"] = "https://gw.example.com/mj/image/" + task["id"]
        return True

    def admit(self, upstream: str, task: dict[str, Any]) -> int | None:
        self.admitted.append((upstream, task["id"]))
        return self.expires


async def test_the_cache_keeps_rewritten_bodies_as_long_as_the_hook_says() -> None:
    store = MemoryStore()
    keys = KeySpace("t")
    config = CacheConfig(terminal_ttl_s=3600, image_expiry_margin_s=10)
    cache = TaskCache(store, keys, config, OwnerMap(store, keys, 60, 100))
    expiring = "https://cdn.discordapp.com/a.png?ex=1&is=2"  # long expired
    task = {"id": "1700000000000001", "status": "SUCCESS", "imageUrl": expiring}
    assert await cache.put_tasks([("main", dict(task), b"{}")]) == [b"{}"]
    assert await store.mget([keys.task("main", "1700000000000001")]) == [None]  # capped by ex=

    hook = Hook(expires=None)  # kept (rehost): the link's expiry no longer matters
    cache.images = hook
    (body,) = await cache.put_tasks([("main", dict(task), b"{}")])
    assert b"https://gw.example.com/mj/image/1700000000000001" in body
    (value,) = await store.mget([keys.task("main", "1700000000000001")])
    assert value is not None and value.endswith(body)
    assert hook.admitted == [("main", "1700000000000001")]

    hook.expires = int(time.time()) + 5  # a signed URL about to expire: not cached
    await cache.put_tasks([("main", {**task, "id": "1700000000000002"}, b"{}")])
    assert await store.mget([keys.task("main", "1700000000000002")]) == [None]


# --- config ---------------------------------------------------------------------------------


def test_every_images_field_is_named_in_the_example() -> None:
    text = EXAMPLE.read_text()
    for section in (ImagesConfig, S3Config):
        for field in dataclasses.fields(section):
            assert f"{field.name}:" in text, f"{section.__name__}.{field.name}"


def test_images_config_is_read_with_secrets_from_the_environment() -> None:
    data = document(
        images={
            "enabled": True,
            "allowed_hosts": ["CDN.Example.com", "*.discordapp.net", "*", "10.0.0.5", "::1"],
            "dir": "/tmp/images",
            "store": "S3",
            "s3": {
                "endpoint_url": "http://127.0.0.1:9000",
                "bucket": "mj-images",
                "access_key": "${S3_ACCESS}",
                "secret_key": "${S3_SECRET}",
            },
        }
    )
    config = config_from_dict(data, env={"S3_ACCESS": "AKIAEXAMPLE", "S3_SECRET": "s3-secret"})
    images = config.images
    assert images.allowed_hosts == ("cdn.example.com", "*.discordapp.net", "*", "10.0.0.5", "::1")
    assert (images.store, images.s3.bucket, images.s3.prefix) == (
        "s3",
        "mj-images",
        "mjgate/images/",
    )
    assert images.s3.secret_key.reveal() == "s3-secret"
    assert "s3-secret" not in repr(config)
    assert ImagesConfig().enabled is False
    assert ImagesConfig().allowed_hosts == (
        "*.discordapp.com",
        "*.discordapp.net",
        "*.midjourney.com",
    )


@pytest.mark.parametrize(
    ("images", "server", "problem"),
    [
        ({"rehost": True}, {}, "images.rehost: needs images.enabled: true"),
        (
            {"enabled": True, "rewrite": True},
            {},
            "images.rewrite: needs server.public_url and server.secret_key",
        ),
        (
            {"enabled": True, "store": "s3"},
            {},
            "images.s3.bucket: is required with images.store: s3",
        ),
        ({"store": "nfs"}, {}, "images.store: must be disk or s3"),
        ({"allowed_hosts": ["cdn.example.com:443"]}, {}, "images.allowed_hosts[0]: must be"),
        ({"allowed_hosts": ["http://cdn.example.com"]}, {}, "images.allowed_hosts[0]: must be"),
        ({"url_ttl_s": 10}, {}, "images.url_ttl_s: must be at least 60"),
        ({"s3": {"endpoint_url": "minio:9000"}}, {}, "images.s3.endpoint_url: must be an http"),
        ({"s3": {"bucket": "Bad_Bucket"}}, {}, "images.s3.bucket: must match"),
        ({"sizes": 1}, {}, "images.sizes: unknown key"),
    ],
)
def test_images_config_problems(
    images: dict[str, Any], server: dict[str, Any], problem: str
) -> None:
    assert only_problem(document(images=images, server=server)).startswith(problem)


def test_a_rewriting_config_with_its_server_settings_loads() -> None:
    data = document(
        images={"enabled": True, "rewrite": True, "rehost": True},
        server={"secret_key": "k" * 32, "public_url": "https://gw.example.com"},
    )
    assert config_from_dict(data, env={}).images.rewrite is True
    with pytest.raises(ConfigError):
        config_from_dict(document(images={"max_bytes": 0}), env={})
