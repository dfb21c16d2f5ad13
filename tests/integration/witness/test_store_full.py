"""A bypass seen while the store cannot append (a full disk): the alert is
kept and written when space returns, and the witness goes on. Before, the
alert's StoreError ended the witness's poll thread for good."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest

import small_disk
from agent.demo.sandbox import wait_for
from agent.store import StoreWriter

from . import helpers
from .conftest import running_witness, witness_config
from .test_witness import SUBJ_CONNECT

PORT = 18461


@pytest.fixture
def full_store(netns_inode):
    d = Path(tempfile.mkdtemp(prefix="tollgate-witness-full-"))
    with small_disk.tmpfs(d, "1m"):
        w = StoreWriter(d / "store", segment_max_bytes=200_000, immutable=False)
        small_disk.fill(w)
        yield d, w
        w.close()
    d.rmdir()


def test_a_bypass_while_the_store_is_full_is_kept_and_the_witness_goes_on(full_store, sessions):
    mount, store = full_store
    server = helpers.start_server(PORT)
    w = running_witness(witness_config(perf_pages=64), store, sessions)
    try:
        first = helpers.run_subject(SUBJ_CONNECT, "127.0.0.1", str(PORT))
        wait_for(lambda: w.check.counts["alert_bypass"] >= 1, 10, what="the bypass")
        assert not store.healthy and w.errors == 0
        small_disk.resize(mount, "4m")
        assert store.probe()                      # the kept alert is written now
        helpers.wait_alert(mount / "store", type="bypass", sport=first["sport"])
        second = helpers.run_subject(SUBJ_CONNECT, "127.0.0.1", str(PORT))
        helpers.wait_alert(mount / "store", type="bypass", sport=second["sport"])
    finally:
        w.stop()
        server.kill()
        server.wait()
