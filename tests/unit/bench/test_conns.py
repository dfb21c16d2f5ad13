"""The connection rate's pooling: failed connections are not in a path's
rate, so the table says when there were any."""

from __future__ import annotations

from bench.run import _Conns
from bench.table import Results


def pooled(failed: int) -> Results:
    conns, res = _Conns(), Results(machine={}, command="test", scale={})
    for col in ("haproxy", "tollgate write (native)"):
        conns.done[col], conns.seconds[col] = 10_000, 2.0
        conns.failed[col] = failed if col.startswith("tollgate") else 0
    conns.put(res)
    assert res.figures["rate"] == {"haproxy": 5000.0, "tollgate write (native)": 5000.0}
    return res


def test_failed_connections_are_noted_with_their_path():
    assert pooled(3).notes == [
        "connection rate: 3 of 10,003 connections through tollgate write (native) failed"]


def test_no_note_when_none_failed():
    assert pooled(0).notes == []
