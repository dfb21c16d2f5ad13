"""The bench table's latency rows: added latency is signed, and a baseline
no slower than direct (noise at p99) gives no ratio, not a bogus one."""

from __future__ import annotations

from bench.table import Results, rows


def latency_row(direct: float, haproxy: float, tollgate: float) -> list[str]:
    res = Results(machine={}, command="test", scale={})
    for col, v in (("direct", direct), ("haproxy", haproxy), ("tollgate write (native)", tollgate)):
        res.put("rtt_p99", col, v)
    return next(r for r in rows(res) if r[0].startswith("latency p99"))


def test_added_latency_and_its_ratio_to_haproxys():
    row = latency_row(20.0, 40.0, 50.0)
    assert row[4] == "tollgate write (native): 50.0 (+30.0)"
    assert row[5] == "1.50x haproxy's added (+20.0)" and row[7] == "MISSED"


def test_haproxy_faster_than_direct_has_no_ratio_and_a_plain_minus():
    row = latency_row(126.0, 65.8, 236.0)
    assert row[4] == "tollgate write (native): 236 (+110)"
    assert row[5] == "n/a: haproxy's added (-60.2)" and row[7] == "n/a"
