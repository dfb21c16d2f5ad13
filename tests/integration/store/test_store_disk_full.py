"""Disk full on a small tmpfs: StoreError, no partial record, recovery when space returns."""

from __future__ import annotations

import subprocess

import pytest

from agent.store import Direction, Kind, StoreError, StoreWriter, verify
from agent.store.reader import segment_paths


def _fill(w: StoreWriter) -> None:
    """Down to the last byte: big records, then ever smaller ones."""
    for size in (3000, 100, 1):
        with pytest.raises(StoreError):
            for i in range(100_000):
                w.append_data(1, Direction.SERVER, bytes([i % 256]) * size)


def test_disk_full_then_space_returns(small_tmpfs):
    store = small_tmpfs / "store"
    w = StoreWriter(store, segment_max_bytes=200_000)
    _fill(w)
    assert not w.healthy and "No space" in w.last_error
    # no partial record: every segment ends exactly on a whole record
    assert verify(store, allow_torn_tail=False).ok
    assert w.defer_json(Kind.ALERT, {"type": "store_failed"}) is None
    assert not w.probe()
    with pytest.raises(StoreError):
        w.append_data(2, Direction.CLIENT, b"x" * 3000)
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    assert w.probe() and w.healthy
    seq = w.append_data(3, Direction.CLIENT, b"after")
    w.close()
    r = verify(store)
    assert r.ok, r.failures
    kinds = {}
    from agent.store import iter_records
    for rec in iter_records(store):
        kinds.setdefault(rec.kind, []).append(rec)
    assert kinds[Kind.ALERT][-1].json() == {"type": "store_failed"}
    recovered = [e.json() for e in kinds[Kind.EVENT] if e.json()["event"] == "store_recovered"]
    assert recovered and recovered[-1]["failed_appends"] >= 2
    assert kinds[Kind.DATA][-1].seq == seq


def test_rotation_into_a_full_disk_changes_nothing(small_tmpfs):
    store = small_tmpfs / "store"
    w = StoreWriter(store, segment_max_bytes=4000)
    _fill(w)
    before = [p.name for p in segment_paths(store)]
    with pytest.raises(StoreError):
        w.append_data(1, Direction.CLIENT, b"y" * 3000)
    assert [p.name for p in segment_paths(store)] == before
    subprocess.run(["mount", "-o", "remount,size=4m", str(small_tmpfs)], check=True)
    w.append_data(1, Direction.CLIENT, b"z")
    w.close()
    assert verify(store).ok
