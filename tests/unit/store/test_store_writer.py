"""Writer upkeep: rotation by size and age, seals by bytes and time, statistics."""

from __future__ import annotations

import contextlib
import resource
import signal
import threading
import time

import psutil
import pytest

from agent.native import APPEND_MANY_MAX
from agent.store import Direction, Kind, SealKey, StoreError, StoreWriter, init_key, verify
from agent.store.reader import iter_records, segment_paths
from page_cache import cached_bytes
from store_forge import segments


def test_rotation_by_size_links_segments(tmp_path):
    w = StoreWriter(tmp_path, segment_max_bytes=1000, immutable=False)
    for i in range(50):
        w.append_data(1, Direction.CLIENT, b"x" * 100)
    w.close()
    segs = segments(tmp_path)
    assert len(segs) > 5
    for before, seg in zip(segs, segs[1:]):
        prev = seg[0].json()["previous"]
        assert prev["last_seq"] == before[-1].seq and prev["head"] == before[-1].hash.hex()
    assert verify(tmp_path).ok


def test_finished_segments_leave_the_page_cache(tmp_path):
    """Once a finished segment is on disk its pages go, so a busy store
    does not grow the page cache by every byte it records."""
    w = StoreWriter(tmp_path, segment_max_bytes=1 << 20, immutable=False)
    for _ in range(60):
        w.append_data(1, Direction.CLIENT, b"z" * (64 << 10))
    w.close()
    cached = [cached_bytes(p) for p in segment_paths(tmp_path)]
    assert len(cached) >= 3
    assert cached[:-1] == [0] * (len(cached) - 1)  # finished: on disk, dropped
    assert cached[-1] > 0  # the active one was not finished, only closed
    assert verify(tmp_path).ok


def test_rotation_by_age(tmp_path):
    w = StoreWriter(tmp_path, segment_max_age_s=0.05, immutable=False)
    w.append_json(Kind.EVENT, {"n": 1})
    time.sleep(0.06)
    w.maintain()
    w.maintain()  # an empty new segment is not rotated again
    w.append_json(Kind.EVENT, {"n": 2})
    w.close()
    assert len(segment_paths(tmp_path)) == 2
    assert verify(tmp_path).ok


def _sealing_by_bytes(tmp_path, chunks: int, seal_interval_s: float):
    """(k0, writer) after chunks of 500 bytes, a seal due every 2000."""
    k0 = init_key(tmp_path / "k")
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(tmp_path / "k"),
                    seal_interval_bytes=2000, seal_interval_s=seal_interval_s)
    for _ in range(chunks):
        w.append_data(1, Direction.SERVER, b"y" * 500)
        w.maintain()
    return k0, w


def test_seals_by_bytes_and_time(tmp_path):
    k0, w = _sealing_by_bytes(tmp_path, 10, seal_interval_s=0.05)
    by_bytes = w.seals
    assert by_bytes >= 2
    w.append_json(Kind.EVENT, {"quiet": True})
    time.sleep(0.06)
    w.maintain()
    assert w.seals == by_bytes + 1
    stats = w.statistics()
    assert stats["sealing"] == "on" and stats["seal_epoch"] == w.seals
    assert stats["sealed_upto"] == w.head[0] - 1
    w.close()
    assert verify(tmp_path / "s", k0).ok


def test_byte_seals_erase_their_keys_once_per_interval(tmp_path, monkeypatch):
    """Every seal has its own epoch, but the key file (and the fsync it
    waits for) moves at most once per seal interval: under bulk traffic
    seals by bytes come hundreds of times a second."""
    k0, w = _sealing_by_bytes(tmp_path, 20, seal_interval_s=30)
    stats = w.statistics()
    assert w.seals >= 4 and stats["seal_epoch"] == w.seals
    assert w.fsyncs == 1  # the first erase, at once; the rest wait for the interval
    assert stats["key_file_epoch"] == SealKey(tmp_path / "k").epoch == 1
    # The interval passes (the clock moves on, not the test: a slow disk
    # must not make the first part see it pass already).
    real = time.monotonic_ns
    monkeypatch.setattr(time, "monotonic_ns", lambda: real() + 31_000_000_000)
    w.maintain()
    assert w.fsyncs == 2 and SealKey(tmp_path / "k").epoch == w.seals
    w.close()
    r = verify(tmp_path / "s", k0)
    assert r.ok and r.seals == r.last_epoch + 1


def test_maintenance_thread_seals_without_help(tmp_path):
    k0 = init_key(tmp_path / "k")
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(tmp_path / "k"),
                    seal_interval_s=0.02, maintain_interval_s=0.01)
    for i in range(5):
        w.append_json(Kind.EVENT, {"i": i})
        time.sleep(0.03)
    w.close()
    r = verify(tmp_path / "s", k0)
    assert r.ok and r.seals >= 3


def _relay_append(w: StoreWriter, data: bytes) -> None:
    """As a relay thread appends: the chain alone, no seal check after it."""
    with w.chain:
        w.chain.append(Kind.DATA, data, time.time_ns(), b"\0" * 9)


def _wakeups(thread: threading.Thread) -> int:
    return psutil.Process(thread.native_id).num_ctx_switches().voluntary


def test_upkeep_seals_a_relay_threads_records_within_the_interval(tmp_path):
    k0 = init_key(tmp_path / "k")
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(tmp_path / "k"),
                    seal_interval_s=0.3, maintain_interval_s=0.1)
    time.sleep(0.5)   # quiet: the upkeep thread sleeps for the seal interval
    _relay_append(w, b"typed after a quiet spell")
    upto = w.head[0]
    time.sleep(0.45)  # the interval, and the thread's 0.1 s granularity
    assert w.seals >= 1 and w._last_seal["seq"] > upto
    w.close()
    assert verify(tmp_path / "s", k0).ok


def test_an_idle_store_upkeep_sleeps_for_the_seal_interval(tmp_path):
    """Every 0.1 s before: an idle agent's store woke ten times a second."""
    init_key(tmp_path / "k")
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(tmp_path / "k"),
                    seal_interval_s=1.0, maintain_interval_s=0.1)
    w.seal_now()
    time.sleep(0.2)
    before = _wakeups(w._thread)
    time.sleep(2.0)
    woke = _wakeups(w._thread) - before
    w.close()
    assert woke <= 4, f"{woke} wake-ups in 2 s"


def test_upkeep_reads_the_segment_ahead_of_a_relay_threads_window(tmp_path):
    """A relay thread's small records map a window; the upkeep thread, woken
    by it, reads the next window's pages into the page cache (chain.warm),
    across a rotation too; closing leaves every segment its records' size."""
    w = StoreWriter(tmp_path / "s", immutable=False, segment_max_bytes=3 << 20,
                    maintain_interval_s=1.0)
    for _ in range(20):
        _relay_append(w, b"x" * 100)
    deadline = time.monotonic() + 5
    while w.chain.warmed < 4 << 20 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert w.chain.warmed == 4 << 20    # the window [0, 2 MiB) asked for [2, 4) MiB
    for _ in range(60_000):             # ~4 MiB: past a window and a rotation
        _relay_append(w, b"x" * 100)
    w.close()
    report = verify(tmp_path / "s")
    assert report.ok and len(report.segments) >= 2
    for seg in report.segments:
        assert (tmp_path / "s" / seg.name).stat().st_size == seg.bytes


def test_json_records_read_back(tmp_path):
    w = StoreWriter(tmp_path, immutable=False)
    seq = w.append_json(Kind.ALERT, {"type": "bypass"})
    w.close()
    rec = next(r for seg in segments(tmp_path) for r in seg if r.seq == seq)
    assert rec.json() == {"type": "bypass"}


def _writes_by_this_thread() -> int:
    """write-family syscalls of the calling thread (the writer's own thread
    may write meanwhile, so not /proc/self)."""
    with open("/proc/thread-self/io") as f:
        return int(next(line.split()[1] for line in f if line.startswith("syscw:")))


def _open_and_info(w: StoreWriter, ts: int = 1_700_000_000_000_000_000) -> int:
    return w.append_json_pair(Kind.SESSION_OPEN, {"client": ["10.0.0.1", 40000]},
                              Kind.SESSION_INFO, lambda sid: {"session": sid, "uid": 7}, ts)


def test_a_json_pair_is_two_chained_records_in_one_copy(tmp_path):
    """Small frames are copied into the mapped segment: no write at all."""
    w = StoreWriter(tmp_path, immutable=False)
    before = w.append_json(Kind.EVENT, {"before": 1})
    writes = _writes_by_this_thread()
    sid = _open_and_info(w)
    assert w.chain.mapped and _writes_by_this_thread() - writes == 0
    after = w.append_json(Kind.EVENT, {"after": 1})
    w.close()
    assert (before, sid, after) == (sid - 1, before + 1, sid + 2)
    recs = {r.seq: r for r in iter_records(tmp_path)}   # checks crc, chain, sequence
    assert recs[sid].kind == Kind.SESSION_OPEN and recs[sid + 1].kind == Kind.SESSION_INFO
    assert recs[sid + 1].json() == {"session": sid, "uid": 7}
    assert recs[sid].ts_ns == recs[sid + 1].ts_ns == 1_700_000_000_000_000_000
    assert verify(tmp_path).ok


def test_many_records_of_a_kind_go_in_batches_past_the_native_limit(tmp_path):
    """Sessions that ended together: their closes are written in order, in
    writes of at most APPEND_MANY_MAX (more than that in one call)."""
    w = StoreWriter(tmp_path, immutable=False)
    first = w.append_json(Kind.EVENT, {"before": 1}) + 1
    closes = [{"session": n, "reason": "eof"} for n in range(APPEND_MANY_MAX * 2 + 3)]
    w.append_json_many(Kind.SESSION_CLOSE, closes, 1_700_000_000_000_000_000)
    w.append_json_many(Kind.SESSION_CLOSE, [])
    after = w.append_json(Kind.EVENT, {"after": 1})
    w.close()
    recs = [r for r in iter_records(tmp_path) if first <= r.seq < after]
    assert [r.json() for r in recs] == closes and after == first + len(closes)
    assert {(r.kind, r.ts_ns) for r in recs} == {(Kind.SESSION_CLOSE, 1_700_000_000_000_000_000)}
    assert verify(tmp_path).ok


@contextlib.contextmanager
def _file_size_limit(limit: int):
    old_handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    old_limit = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, old_limit[1]))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, old_limit)
        signal.signal(signal.SIGXFSZ, old_handler)


def _fill_window(w: StoreWriter, room: int) -> int:
    """Append frames small enough to be copied until about `room` bytes of
    the mapped window are left; returns the window's end (the file's size)."""
    end = segment_paths(w.dir)[-1].stat().st_size
    while (left := end - w.chain.seg_bytes) > room + 1_900 + 200:
        w.append(Kind.EVENT, b"x" * 1_900)
    w.append(Kind.EVENT, b"y" * (left - room - 60))  # 60: the frame's header and crc
    assert 0 < end - w.chain.seg_bytes <= room and segment_paths(w.dir)[-1].stat().st_size == end
    return end


def _fails_then_goes_on(tmp_path, w: StoreWriter, append, limit: int) -> None:
    """append fails under the limit and writes nothing; the segment ends on
    its last record; after recovery the chain goes on from where it was."""
    seg = segment_paths(tmp_path)[-1]
    ends, next_seq = w.chain.seg_bytes, w.chain.next_seq
    with _file_size_limit(limit), pytest.raises(StoreError):
        append()
    assert seg.stat().st_size == ends == w.chain.seg_bytes and w.chain.next_seq == next_seq
    assert w.probe()   # writes its store_recovered event
    append()
    w.close()
    assert verify(tmp_path, allow_torn_tail=False).ok
    kinds = [r.kind for r in iter_records(tmp_path) if r.seq >= next_seq]
    assert kinds[0] == Kind.EVENT and len(kinds) > 1


def test_a_json_pair_past_a_full_window_writes_neither(tmp_path):
    """The next window cannot be preallocated (a file size limit): the pair
    fails whole, the segment is cut back to its records."""
    w = StoreWriter(tmp_path, immutable=False)
    end = _fill_window(w, room=100)
    _fails_then_goes_on(tmp_path, w, lambda: _open_and_info(w), limit=end)


def test_a_large_record_cut_short_is_cut_back(tmp_path):
    """Frames past the copy limit are written: a short write (the file size
    limit lets half of it in) leaves no part of it."""
    w = StoreWriter(tmp_path, immutable=False)
    end = _fill_window(w, room=100)
    _fails_then_goes_on(tmp_path, w, lambda: w.append(Kind.EVENT, b"z" * 200_000),
                        limit=end + 100_000)


def test_a_json_pair_too_big_is_a_store_error_and_writes_neither(tmp_path):
    """As append: a record past the format's limit is StoreError, not the
    chain's ValueError; the first of the pair is not written either."""
    w = StoreWriter(tmp_path, immutable=False)
    w.append_json(Kind.EVENT, {"before": 1})
    next_seq = w._chain.next_seq
    with pytest.raises(StoreError, match="exceeds"):
        w.append_json_pair(Kind.SESSION_OPEN, {"client": ["10.0.0.1", 1]}, Kind.SESSION_INFO,
                           lambda sid: {"session": sid, "argv": ["x" * (16 << 20)]},
                           1_700_000_000_000_000_000)
    assert w._chain.next_seq == next_seq and w.healthy
    w.close()
    assert [r.kind for r in iter_records(tmp_path)][-1] == Kind.EVENT
