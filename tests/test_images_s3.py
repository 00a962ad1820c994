"""``images.store: s3`` against a real S3-compatible server process on loopback: moto's server
mode (``python -m moto.server``, from PyPI's ``moto[server]``); the test looks into the
bucket with botocore.

The bucket is what several replicas share: an image one replica fetched (or rehosted) is
served by another from the bucket, without asking its host again."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from botocore.exceptions import ClientError
from botocore.session import get_session

from gateway.config import Config
from gateway.configfile import config_from_dict
from gateway.images.service import image_key
from tests.images_support import ImageHost, image_host, images_section, png
from tests.sims_extra import unique_id
from tests.support import SimProcess, caller, config_data, free_port, running_gateway, wait_until

BUCKET = "mjgate-images"
PREFIX = "replicas/"
ACCESS_KEY, SECRET_KEY = "moto-access-key", "moto-secret-key-0123456789"


@pytest.fixture(scope="module")
def s3_url() -> Iterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: httpx.get(url).status_code == 200, timeout_s=30, what="moto server")
        s3_client(url).create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with image_host() as started:
        yield started


def s3_config(sims: list[SimProcess], endpoint: str, directory: Path, **images: Any) -> Config:
    s3 = {
        "endpoint_url": endpoint,
        "bucket": BUCKET,
        "access_key": "${S3_ACCESS}",
        "secret_key": "${S3_SECRET}",
        "prefix": PREFIX,
    }
    section = images_section(str(directory), store="s3", s3=s3, **images)
    env = {"S3_ACCESS": ACCESS_KEY, "S3_SECRET": SECRET_KEY}
    return config_from_dict(config_data(sims[:1], images=section), env=env)


def s3_client(url: str) -> Any:  # botocore's clients are typed by their service model
    return get_session().create_client(
        "s3",
        endpoint_url=url,
        region_name="us-east-1",
        aws_access_key_id=ACCESS_KEY,
        aws_secret_access_key=SECRET_KEY,
    )


def in_bucket(s3_url: str, task_id: str, url: str) -> tuple[bytes, str] | None:
    """The object's bytes and content type, None when it is not there."""
    key = f"{PREFIX}{image_key(task_id, url)}"
    try:
        answer = s3_client(s3_url).get_object(Bucket=BUCKET, Key=key)
    except ClientError:
        return None
    return answer["Body"].read(), answer["ContentType"]


def image_of(gateway_url: str, task_id: str) -> httpx.Response:
    return httpx.get(f"{gateway_url}/mj/image/{task_id}", headers=caller(), timeout=20)


def test_an_image_one_replica_fetched_is_served_by_another_from_the_bucket(
    sims: list[SimProcess], host: ImageHost, s3_url: str, tmp_path: Path
) -> None:
    data = png(80, 80, seed=30)
    url = host.add("shared.png", data)
    task_id = unique_id()
    sims[0].seed(id=task_id, imageUrl=url)
    with running_gateway(s3_config(sims, s3_url, tmp_path / "a")) as replica:
        first = image_of(replica.url, task_id)
    stored = in_bucket(s3_url, task_id, url)
    with running_gateway(s3_config(sims, s3_url, tmp_path / "b")) as replica:
        second = image_of(replica.url, task_id)
        third = image_of(replica.url, task_id)
    assert [a.headers["x-image-source"] for a in (first, second, third)] == ["cdn", "s3", "disk"]
    assert first.content == second.content == third.content == data
    assert stored == (data, "image/png")
    assert host.hits["/img/shared.png"] == 1


def test_a_rehosted_image_in_the_bucket_outlives_its_link_for_every_replica(
    sims: list[SimProcess], host: ImageHost, s3_url: str, tmp_path: Path
) -> None:
    host.add("rehosted.png", png(60, 60, seed=31))
    rehosting = s3_config(sims, s3_url, tmp_path / "a", rehost=True)
    with running_gateway(rehosting) as replica:
        expiry = int(time.time()) + 3
        url = f"{host.url}/exp/rehosted.png?ex={expiry:x}"
        task_id = unique_id()
        sims[0].seed(id=task_id, imageUrl=url)
        fetched = httpx.get(f"{replica.url}/mj/task/{task_id}/fetch", headers=caller())
        assert fetched.status_code == 200
        wait_until(lambda: in_bucket(s3_url, task_id, url) is not None, what="rehost")
    time.sleep(max(expiry - time.time(), 0) + 0.2)
    with running_gateway(s3_config(sims, s3_url, tmp_path / "b")) as replica:
        answer = image_of(replica.url, task_id)
    assert answer.status_code == 200 and answer.content == host.image("rehosted.png")
    assert answer.headers["x-image-source"] == "s3"
    assert host.hits["/exp/rehosted.png"] == 1


def test_a_bucket_out_of_reach_falls_back_to_the_host(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    url = host.add("fallback.png", png(20, 20, seed=32))
    task_id = unique_id()
    sims[0].seed(id=task_id, imageUrl=url)
    closed = f"http://127.0.0.1:{free_port()}"
    with running_gateway(s3_config(sims, closed, tmp_path)) as replica:
        answer = image_of(replica.url, task_id)
    assert answer.status_code == 200 and answer.content == host.image("fallback.png")
    assert answer.headers["x-image-source"] == "cdn"
