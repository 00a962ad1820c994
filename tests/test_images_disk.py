"""The image disk cache under the real app: bounded by ``images.max_disk_bytes`` (least
recently served out first), kept across a restart, and never serving half an image, even
when the gateway is killed with SIGKILL in the middle of writing one."""

from __future__ import annotations

import contextlib
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from gateway.configfile import config_from_dict
from tests.images_support import ImageHost, image_host, images_section, png
from tests.sims_extra import unique_id
from tests.support import SimProcess, caller, config_data, free_port, running_gateway, wait_until


@pytest.fixture(scope="module")
def host() -> Iterator[ImageHost]:
    with image_host() as started:
        yield started


def data(sims: list[SimProcess], directory: Path, **images: Any) -> dict[str, Any]:
    return config_data(sims[:1], images=images_section(str(directory), **images))


def files(directory: Path) -> dict[str, int]:
    return {p.name: p.stat().st_size for p in directory.glob("??/*.png")}


def test_eviction_keeps_the_disk_under_its_bound(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    bound = 200_000
    images = {unique_id(): host.add(f"evict-{n}.png", png(100, 100, seed=n)) for n in range(12)}
    for task_id, url in images.items():
        sims[0].seed(id=task_id, imageUrl=url)
    config = config_from_dict(data(sims, tmp_path, max_disk_bytes=bound, max_bytes=bound), env={})
    with running_gateway(config) as gateway, httpx.Client(headers=caller()) as client:
        first = next(iter(images))
        for task_id in images:
            assert client.get(f"{gateway.url}/mj/image/{task_id}").status_code == 200
            assert sum(files(tmp_path).values()) <= bound
            assert int((tmp_path / "usage").read_text()) == sum(files(tmp_path).values())
        last = list(images)[-1]
        assert client.get(f"{gateway.url}/mj/image/{last}").headers["x-image-source"] == "disk"
        again = client.get(f"{gateway.url}/mj/image/{first}")
    assert 0 < len(files(tmp_path)) < len(images)
    assert again.headers["x-image-source"] == "cdn"  # evicted, fetched again
    assert again.content == host.image("evict-0.png")


def test_the_disk_cache_survives_a_restart(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    task_id = unique_id()
    sims[0].seed(id=task_id, imageUrl=host.add("restart.png", png(50, 50, seed=20)))
    config = config_from_dict(data(sims, tmp_path), env={})
    sources = []
    for _ in range(2):
        with running_gateway(config) as gateway:
            answer = httpx.get(f"{gateway.url}/mj/image/{task_id}", headers=caller())
            sources.append(answer.headers["x-image-source"])
            assert answer.content == host.image("restart.png")
    assert sources == ["cdn", "disk"]
    assert host.hits["/img/restart.png"] == 1


class GatewayProcess:
    """``python -m gateway serve`` as its own process, which a test may SIGKILL."""

    def __init__(self, document: dict[str, Any], workdir: Path) -> None:
        self.port = free_port()
        self.config = workdir / "config.yaml"
        self.config.write_text(yaml.safe_dump(document))
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        args = [sys.executable, "-m", "gateway", "serve", "--config", str(self.config)]
        args += ["--host", "127.0.0.1", "--port", str(self.port)]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: httpx.get(f"{self.url}/healthz").status_code == 200, what="gateway")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)


@contextmanager
def gateway_process(document: dict[str, Any], workdir: Path) -> Iterator[GatewayProcess]:
    gateway = GatewayProcess(document, workdir)
    gateway.start()
    try:
        yield gateway
    finally:
        gateway.stop()


def test_kill_9_while_writing_leaves_no_partial_image_served(
    sims: list[SimProcess], host: ImageHost, tmp_path: Path
) -> None:
    image = png(300, 300, seed=21)
    host.add("partial.png", image)
    task_id = unique_id()
    sims[0].seed(id=task_id, imageUrl=f"{host.url}/slow/partial.png?delay=0.5&chunks=4")
    directory = tmp_path / "images"
    document = data(sims, directory)
    temp = directory / "tmp"

    def partial() -> list[Path]:
        return [p for p in temp.glob("*.part") if p.stat().st_size > 0]

    with gateway_process(document, tmp_path) as gateway:
        url = f"{gateway.url}/mj/image/{task_id}"

        def ask() -> None:
            with contextlib.suppress(httpx.HTTPError):  # the gateway dies under it
                httpx.get(url, headers=caller(), timeout=10)

        waiting = threading.Thread(target=ask, daemon=True)
        waiting.start()
        wait_until(partial, what="half an image on disk")
        gateway.kill()
        waiting.join(timeout=10)
    (left,) = partial()
    assert 0 < left.stat().st_size < len(image)
    assert files(directory) == {}
    with gateway_process(document, tmp_path) as gateway:
        answer = httpx.get(f"{gateway.url}/mj/image/{task_id}", headers=caller(), timeout=20)
    assert answer.status_code == 200
    assert answer.content == image
    assert answer.headers["x-image-source"] == "cdn"
    assert host.hits["/slow/partial.png"] == 2
    assert list(files(directory).values()) == [len(image)]
    assert left.exists()  # left in tmp/ until it is stale, and never served
