"""Retention: only old, shipped segments go, never the active one, and it is recorded."""

from __future__ import annotations

import os
import time

from agent.store import Direction, StoreWriter, gc, verify
from agent.store.gc import gc_event, plan_gc
from agent.store.reader import segment_paths


def _store(tmp_path):
    w = StoreWriter(tmp_path, segment_max_bytes=600, immutable=False)
    for i in range(30):
        w.append_data(1, Direction.CLIENT, b"q" * 100)
    old = time.time() - 10 * 86400
    for p in segment_paths(tmp_path):
        os.utime(p, (old, old))
    return w


def test_nothing_without_a_cursor_unless_allowed(tmp_path):
    w = _store(tmp_path)
    assert gc(tmp_path, 1) == []
    deleted = gc(tmp_path, 1, allow_unshipped=True, writer=w)
    paths = segment_paths(tmp_path)
    assert deleted and len(paths) >= 1 and paths[-1].name == w.statistics()["segment"]
    w.close()
    r = verify(tmp_path)
    assert r.ok, r.failures
    assert r.gc_before == int(paths[0].stem)


def test_only_shipped_and_old(tmp_path):
    w = _store(tmp_path)
    segs = segment_paths(tmp_path)
    shipped = plan_gc(tmp_path, 1, allow_unshipped=True)[1]["last_seq"]
    deleted = gc(tmp_path, 1, shipped_upto_seq=shipped, writer=w)
    assert [d["segment"] for d in deleted] == [s.name for s in segs[:2]]
    assert gc(tmp_path, 30, allow_unshipped=True, writer=w) == []  # not old enough
    w.close()
    assert verify(tmp_path).ok


def test_gc_without_its_record_fails_verify(tmp_path):
    w = _store(tmp_path)
    deleted = gc(tmp_path, 1, allow_unshipped=True)
    w.close()
    assert not verify(tmp_path).ok
    w = StoreWriter(tmp_path, immutable=False)
    w.append_json(6, gc_event(deleted))  # the caller records it late: now whole again
    w.close()
    assert verify(tmp_path).ok
