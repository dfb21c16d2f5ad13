"""Fixtures for the witness tests: root and BCC required (CI runs as root)."""

from __future__ import annotations

import os
import threading
from dataclasses import replace

import pytest

from agent.config import Config, WitnessConfig
from agent.store import StoreWriter
from agent.witness import Witness

from . import helpers

pytestmark = [pytest.mark.root, pytest.mark.bpf]


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="witness tests need root and BPF")
        for item in items:
            if "integration/witness" in str(item.fspath):
                item.add_marker(skip)


class FakeSessions:
    """A proxy session table that knows what the test tells it."""

    def __init__(self):
        self.tuples: set[tuple] = set()
        self.dst_ports: set[int] = set()
        self.calls = 0
        self._lock = threading.Lock()

    def match(self, client_ip: str, client_port: int, dst_ip: str, dst_port: int) -> bool:
        with self._lock:
            self.calls += 1
            return (dst_port in self.dst_ports
                    or (client_ip, client_port, dst_ip, dst_port) in self.tuples)


def witness_config(**witness) -> Config:
    helpers.ensure_subject()
    return Config(subjects=(helpers.SUBJECT,),
                  witness=replace(WitnessConfig(match_window_ms=300, sweep_interval_s=0.5),
                                  **witness))


@pytest.fixture(scope="module")
def netns_inode():
    helpers.ensure_subject()
    inode = helpers.make_netns()
    yield inode
    helpers.delete_netns()


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("witness-store")


@pytest.fixture(scope="module")
def store(store_dir):
    w = StoreWriter(store_dir)
    yield w
    w.close()


@pytest.fixture(scope="module")
def sessions():
    return FakeSessions()


def running_witness(cfg: Config, store, sessions):
    w = Witness(cfg, store, sessions)
    w.start()
    return w
