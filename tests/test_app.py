"""gateway/app.py: what the app's lifespan does to the process once its services are up."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from gateway.app import GC_YOUNG_THRESHOLD
from tests.support import SimProcess, make_config, running_gateway


@pytest.fixture
def collector_restored() -> Iterator[None]:
    """The lifespan tunes the process's collector: this test process's is put back."""
    threshold = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*threshold)


@pytest.mark.usefixtures("collector_restored")
def test_a_started_app_collects_its_young_generation_less_often(sims: list[SimProcess]) -> None:
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    with running_gateway(make_config(sims)):
        assert gc.get_threshold() == (GC_YOUNG_THRESHOLD, 10, 10)
        assert gc.get_freeze_count() > 0  # start-up's objects are out of every collection
