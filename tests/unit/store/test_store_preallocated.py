"""The active segment is mapped and preallocated ahead of its records
(agent/native/chain.c): readers stop at the zeros, a finished or closed
segment ends on its last record, and a crash leaves zeros that the next
open trims without calling anything lost."""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap

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


def test_a_frame_whose_header_never_came_is_torn_and_kept(tmp_path):
    """A crash between a frame's body and its header (written last)."""
    w = StoreWriter(tmp_path, immutable=False)
    w.append_json(Kind.EVENT, {"whole": True})
    end = w.chain.seg_bytes
    seg = segment_paths(tmp_path)[-1]
    body = b'{"cut":"before its header"}' + b"\x12\x34\x56\x78"
    with open(seg, "r+b") as f:
        f.seek(end + HEADER_SIZE)
        f.write(body)
    size = seg.stat().st_size
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
