"""Disk full on a small tmpfs: StoreError, no partial record, recovery when space returns."""

from __future__ import annotations

import pytest

from agent.store import Direction, Kind, StoreError, StoreWriter, verify
from agent.store.reader import segment_paths
from small_disk import fill, resize


def test_disk_full_then_space_returns(small_tmpfs):
    store = small_tmpfs / "store"
    w = StoreWriter(store, segment_max_bytes=200_000)
    fill(w)
    assert not w.healthy and "No space" in w.last_error
    # no partial record: every segment ends exactly on a whole record
    assert verify(store, allow_torn_tail=False).ok
    assert w.defer_json(Kind.ALERT, {"type": "store_failed"}) is None
    assert not w.probe()
    with pytest.raises(StoreError):
        w.append_data(2, Direction.CLIENT, b"x" * 3000)
    resize(small_tmpfs, "4m")
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
    fill(w)
    before = [p.name for p in segment_paths(store)]
    with pytest.raises(StoreError):
        w.append_data(1, Direction.CLIENT, b"y" * 3000)
    assert [p.name for p in segment_paths(store)] == before
    resize(small_tmpfs, "4m")
    w.append_data(1, Direction.CLIENT, b"z")
    w.close()
    assert verify(store).ok
