"""Fixtures for the shipper tests: a store, a fake Cloud Logging, a config."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from agent.store.writer import StoreWriter  # noqa: E402
from tests.fakes.clock import WarpClock  # noqa: E402
from tests.fakes.cloud_logging import FakeCloudLogging  # noqa: E402


@pytest.fixture
def clock() -> WarpClock:
    return WarpClock()


@pytest.fixture
def server(clock):
    srv = FakeCloudLogging(clock=clock.time).start()
    yield srv
    srv.stop()


@pytest.fixture
def store(tmp_path) -> StoreWriter:
    w = StoreWriter(tmp_path / "store")
    yield w
    w.close()
