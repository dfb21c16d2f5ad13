"""Entries, cursor and backoff on their own (no server)."""

from __future__ import annotations

import base64
import itertools
import random
import sys
from pathlib import Path

import pytest
from google.api_core import exceptions as gexc
from hypothesis import given, settings, strategies as st

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from agent.ship.cursor import Cursor  # noqa: E402
from agent.ship.entries import Target, build_entries  # noqa: E402
from agent.ship.retry import Backoff, Stopped  # noqa: E402
from agent.store.format import ZERO_HASH, Kind, Record, data_payload_head, Direction  # noqa: E402

TARGET = Target("p", "tollgate", "tollgate-alerts", "tollgate-seals", "gce_instance",
                {"project_id": "p", "instance_id": "1", "zone": "z"}, "host", "abc")


def _record(payload: bytes, kind: Kind = Kind.DATA) -> Record:
    return Record(7, 1_700_000_000_123_456_789, kind, ZERO_HASH, payload, b"\1" * 32,
                  "x.seg", 0)


@settings(max_examples=15, deadline=None)
@given(size=st.integers(0, 600 << 10), seed=st.integers(0, 2**32))
def test_any_payload_splits_under_limit_and_reassembles(size: int, seed: int) -> None:
    data = data_payload_head(3, Direction.CLIENT) + random.Random(seed).randbytes(size)
    parts = build_entries(_record(data), TARGET, "devin")
    assert all(p.ByteSize() < 256 << 10 for p in parts)
    assert len({p.insert_id for p in parts}) == len(parts)
    raw = b"".join(base64.b64decode(p.json_payload.fields["payload_b64"].string_value)
                   for p in parts)
    assert raw == data
    assert all(p.timestamp.ToNanoseconds() == 1_700_000_000_123_456_789 for p in parts)


def test_same_record_same_entries() -> None:
    rec = _record(b'{"session": 1, "x": [1, 2]}', Kind.SESSION_CLOSE)
    a, b = build_entries(rec, TARGET, None), build_entries(rec, TARGET, None)
    assert [e.SerializeToString(deterministic=True) for e in a] == \
           [e.SerializeToString(deterministic=True) for e in b]
    assert a[0].labels["session"] == "1"


def test_cursor_persists_and_ignores_other_store(tmp_path) -> None:
    c = Cursor(tmp_path / "c.json", "s1")
    c.advance(42)
    c.advance(10)  # never backwards
    assert Cursor(tmp_path / "c.json", "s1").next_seq == 42
    assert Cursor(tmp_path / "c.json", "s2").next_seq == 0
    assert not list(tmp_path.glob("*.tmp"))


def test_backoff_grows_to_cap_with_jitter() -> None:
    delays = list(itertools.islice(Backoff(1.0, 60.0).delays(), 30))
    assert 0.5 <= delays[0] <= 1.0 and all(30 <= d <= 60 for d in delays[10:])
    assert len(set(delays)) == len(delays)


def test_backoff_retries_transient_without_limit_and_stops() -> None:
    calls = itertools.count()
    slept: list[float] = []

    def flaky() -> str:
        if next(calls) < 500:
            raise gexc.ResourceExhausted("quota")
        return "ok"
    assert Backoff(sleep=slept.append).call(flaky) == "ok" and len(slept) == 500
    with pytest.raises(gexc.PermissionDenied):
        Backoff(sleep=slept.append).call(lambda: (_ for _ in ()).throw(
            gexc.PermissionDenied("no")))
    with pytest.raises(Stopped):
        Backoff(sleep=lambda d: True).call(lambda: (_ for _ in ()).throw(
            gexc.ServiceUnavailable("down")))


def test_iter_records_start_seq_skips_segments(tmp_path) -> None:
    from agent.store.reader import iter_records
    from agent.store.writer import StoreWriter
    w = StoreWriter(tmp_path / "s", segment_max_bytes=2000)
    for i in range(100):
        w.append_json(Kind.EVENT, {"i": i})
    w.close()
    assert len(list((tmp_path / "s").glob("*.seg"))) > 3
    everything = [r.seq for r in iter_records(tmp_path / "s")]
    for start in (0, 1, 37, everything[-1], everything[-1] + 1):
        assert [r.seq for r in iter_records(tmp_path / "s", start_seq=start)] == \
               [s for s in everything if s >= start]


def test_ship_config_limits(tmp_path) -> None:
    from agent.config import ConfigError, load
    p = tmp_path / "t.toml"
    for bad in ("batch_entries = 1001", "batch_bytes = 20000000", "rpc_timeout_s = 0"):
        p.write_text(f'subjects = ["nobody"]\n[ship]\n{bad}\n')
        with pytest.raises(ConfigError, match="ship"):
            load(p)
    p.write_text('subjects = ["nobody"]\n[ship]\ninsecure = true\nstate_dir = "/x"\n')
    assert load(p).ship.insecure is True
