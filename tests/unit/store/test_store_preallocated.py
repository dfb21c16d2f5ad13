"""The active segment is mapped and preallocated ahead of its records
(agent/native/chain.c): readers stop at the zeros, a finished or closed
segment ends on its last record, and a crash leaves zeros that the next
open trims without calling anything lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

import pytest

from agent.store import Kind, StoreWriter, iter_records, verify
from agent.store.format import HEADER_SIZE
from agent.store.reader import segment_paths, written_end


def test_a_live_segment_is_read_to_its_last_record(tmp_path):
    w = StoreWriter(tmp_path, immutable=False)
    seqs = [w.append_json(Kind.EVENT, {"i": i}) for i in range(50)]
    seg = segment_paths(tmp_path)[-1]
    assert seg.stat().st_size > w.chain.seg_bytes  # the preallocated window
    assert written_end(seg) == w.chain.seg_bytes
    assert [r.seq for r in iter_records(tmp_path)][-50:] == seqs
    r = verify(tmp_path, allow_torn_tail=False)  # zeros are not a torn tail
    assert r.ok and r.torn_tail == 0, r.failures
    w.close()
    assert seg.stat().st_size == written_end(seg)


def test_finished_segments_end_on_their_last_record(tmp_path):
    w = StoreWriter(tmp_path, immutable=False, segment_max_bytes=20_000)
    for i in range(300):
        w.append_json(Kind.EVENT, {"i": i, "pad": "x" * 200})
    paths = segment_paths(tmp_path)
    assert len(paths) > 3
    for p in paths[:-1]:
        assert p.stat().st_size == written_end(p)
    w.close()
    assert verify(tmp_path, allow_torn_tail=False).ok


def test_zeros_after_a_finished_segment_are_a_failure(tmp_path):
    w = StoreWriter(tmp_path, immutable=False, segment_max_bytes=2_000)
    for i in range(30):
        w.append_json(Kind.EVENT, {"i": i, "pad": "x" * 200})
    w.close()
    first = segment_paths(tmp_path)[0]
    with open(first, "ab") as f:
        f.write(bytes(4096))
    r = verify(tmp_path)
    assert not r.ok and r.failures[0].segment == first.name


KILLED = textwrap.dedent("""
    import os, signal, sys
    from agent.store import Kind, StoreWriter
    w = StoreWriter(sys.argv[1], immutable=False)
    for i in range(int(sys.argv[2])):
        w.append_json(Kind.EVENT, {"i": i})
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_a_killed_writer_leaves_zeros_the_next_open_trims(tmp_path):
    store = tmp_path / "s"
    p = subprocess.run([sys.executable, "-c", KILLED, str(store), "1000"])
    assert p.returncode == -signal.SIGKILL
    seg = segment_paths(store)[-1]
    end = written_end(seg)
    assert seg.stat().st_size > end
    w = StoreWriter(store, immutable=False)
    assert w.recovered is None  # zeros are not evidence: nothing was lost
    assert seg.stat().st_size == end == w.chain.seg_bytes
    w.append_json(Kind.EVENT, {"after": "restart"})
    w.close()
    events = [r.json() for r in iter_records(store) if r.kind == Kind.EVENT]
    assert [e["i"] for e in events if "i" in e] == list(range(1000))
    assert verify(store, allow_torn_tail=False).ok


@pytest.mark.parametrize("header", [b"", b"G\x03\x04"], ids=["none", "all but its first byte"])
def test_a_frame_whose_first_byte_never_came_is_torn_and_kept(tmp_path, header):
    """A crash before a frame's first byte (written last)."""
    w = StoreWriter(tmp_path, immutable=False)
    w.append_json(Kind.EVENT, {"whole": True})
    end = w.chain.seg_bytes
    seg = segment_paths(tmp_path)[-1]
    body = b'{"cut":"before its first byte"}' + b"\x12\x34\x56\x78"
    with open(seg, "r+b") as f:
        f.seek(end + 1)
        f.write(header)
        f.seek(end + HEADER_SIZE)
        f.write(body)
    size = seg.stat().st_size
    live = verify(tmp_path, allow_torn_tail=True)  # as `tollgate verify` of a running agent
    assert live.ok and live.torn_tail == HEADER_SIZE + len(body)
    w.chain.fd = -1  # the crash: nothing trimmed, nothing closed properly
    w = StoreWriter(tmp_path, immutable=False)
    rec = w.recovered
    assert rec["reason"] == "no header" and rec["kept_bytes"] == end
    assert rec["dropped_bytes"] == size - end
    assert rec["trailing_zero_bytes"] == size - end - HEADER_SIZE - len(body)
    kept = (tmp_path / rec["saved_as"]).read_bytes()
    assert kept[HEADER_SIZE:HEADER_SIZE + len(body)] == body
    w.close()
    assert verify(tmp_path, allow_torn_tail=False).ok


WRITING = textwrap.dedent("""
    import sys
    from agent.store import Kind, StoreWriter
    w = StoreWriter(sys.argv[1], immutable=False, segment_max_bytes=1 << 20)
    print("open", flush=True)
    for i in range(int(sys.argv[2])):
        w.append_json(Kind.EVENT, {"i": i, "pad": "p" * (i % 300)})
    w.close()
""")


def test_a_store_being_written_reads_whole_from_another_process(tmp_path):
    """Readers never see a frame before all of it: verify of the live store
    (another process appending and rotating) finds no fault at any moment."""
    store = tmp_path / "s"
    p = subprocess.Popen([sys.executable, "-c", WRITING, str(store), "60000"],
                         stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline() == "open\n"
    looks = 0
    while p.poll() is None:
        r = verify(store, allow_torn_tail=True)
        assert r.ok, r.failures
        looks += 1
    assert p.returncode == 0 and looks > 3
    r = verify(store, allow_torn_tail=False)
    assert r.ok and r.records >= 60000, r.failures
