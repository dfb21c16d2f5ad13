"""Crash recovery: a torn tail is cut back to exactly the whole records before it."""

from __future__ import annotations

import shutil

import pytest

from agent.store import Direction, Kind, SealKey, StoreWriter, init_key, verify
from agent.store.reader import segment_paths
from store_forge import build_store, frame_spans, segments


def _reopen(store):
    w = StoreWriter(store, immutable=False)
    w.close()
    return w


def test_truncate_at_every_offset_of_the_last_records(tmp_path):
    store, _ = build_store(tmp_path, key=False, segment_max_bytes=1 << 20, records=20)
    spans = frame_spans(store)
    path = segment_paths(store)[0]
    original = path.read_bytes()
    last_three_start = spans[-3][1]
    for cut in range(last_three_start, len(original) + 1):
        for p in store.glob("*.torn-*"):
            p.unlink()
        path.write_bytes(original[:cut])
        w = _reopen(store)
        kept = [s for s in spans if s[2] <= cut]
        recs = segments(store)[0]
        assert [r.hash for r in recs[:len(kept)]] == [s[3].hash for s in kept], cut
        whole = cut == kept[-1][2]
        assert (w.recovered is None) == whole, cut
        if not whole:
            assert recs[len(kept)].kind == Kind.RECOVERED
            assert w.recovered["dropped_bytes"] == cut - kept[-1][2]
            assert next(store.glob("*.torn-*")).read_bytes() == original[kept[-1][2]:cut]
        assert verify(store).ok, cut


def test_cut_inside_the_segment_start_of_a_new_segment(tmp_path):
    """A crash right after rotation: the new segment is empty or torn in its first record."""
    store, _ = build_store(tmp_path, key=False)
    last = segment_paths(store)[-1]
    data = last.read_bytes()
    for cut in (0, 10, 70):
        last.write_bytes(data[:cut])
        w = StoreWriter(store, immutable=False)
        w.append_json(Kind.EVENT, {"after": cut})
        w.close()
        r = verify(store)
        assert r.ok, (cut, r.failures)
        assert segments(store)[-1][0].kind == Kind.SEGMENT_START


def test_bad_crc_in_the_tail_is_cut(tmp_path):
    store, _ = build_store(tmp_path, key=False, segment_max_bytes=1 << 20, records=10)
    path = segment_paths(store)[0]
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))
    w = _reopen(store)
    assert w.recovered["reason"] == "crc mismatch"
    assert verify(store).ok


def test_crash_after_seal_before_key_erased(tmp_path):
    """The seal reached disk, the key file did not advance: the next seal still follows."""
    k0 = init_key(tmp_path / "k" / "seal.key")
    keyfile = tmp_path / "k" / "seal.key"
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(keyfile))
    w.append_json(Kind.EVENT, {"a": 1})
    w.seal_now()
    before = keyfile.read_bytes()
    w.append_json(Kind.EVENT, {"a": 2})
    w.close()  # seals epoch 1 and advances the key to 2
    keyfile.write_bytes(before)  # as if the crash came before the key advanced
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(keyfile))
    w.append_json(Kind.EVENT, {"a": 3})
    w.close()
    r = verify(tmp_path / "s", k0)
    assert r.ok, r.failures
    assert r.last_epoch == 2


@pytest.mark.parametrize("lost", ["nothing", "the seals after the key file's"])
def test_crash_with_the_key_file_behind_memory(tmp_path, lost):
    """Seals by bytes step the key in memory; the file lags, and may lag
    seals that reached the disk: the next agent seals on without a gap
    either way, because the file never runs ahead of a durable seal."""
    k0 = init_key(tmp_path / "seal.key")
    w = StoreWriter(tmp_path / "s", immutable=False, seal_key=SealKey(tmp_path / "seal.key"),
                    seal_interval_bytes=2000, seal_interval_s=3600)
    for i in range(20):
        w.append_data(1, Direction.CLIENT, bytes([i]) * 500)
        w.maintain()
    assert SealKey(tmp_path / "seal.key").epoch == 1 < w.seals
    # What a kill -9 now leaves, and with "lost" what a power cut may take:
    # everything after the one seal that was fsynced before its key moved.
    shutil.copytree(tmp_path / "s", tmp_path / "crashed")
    shutil.copy(tmp_path / "seal.key", tmp_path / "crashed.key")
    w.close()
    if lost != "nothing":
        seg, _, end, _ = next(sp for sp in frame_spans(tmp_path / "crashed")
                              if sp[3].kind == Kind.SEAL)
        path = tmp_path / "crashed" / seg
        path.write_bytes(path.read_bytes()[:end])
    w = StoreWriter(tmp_path / "crashed", immutable=False,
                    seal_key=SealKey(tmp_path / "crashed.key"))
    w.append_json(Kind.EVENT, {"after": "restart"})
    w.close()
    r = verify(tmp_path / "crashed", k0)
    assert r.ok, r.failures
    assert r.seals == r.last_epoch + 1  # every epoch once, none skipped


@pytest.mark.parametrize("cut_extra", [1, 30])
def test_recovered_store_keeps_appending_and_sealing(tmp_path, cut_extra):
    store, k0 = build_store(tmp_path)
    w = StoreWriter(store, immutable=False)  # records after the last seal, then a crash
    for i in range(3):
        w.append_json(Kind.EVENT, {"unsealed": i})
    w.close()
    last = segment_paths(store)[-1]
    last.write_bytes(last.read_bytes()[:-cut_extra])
    w = StoreWriter(store, immutable=False, seal_key=SealKey(tmp_path / "keys" / "seal.key"))
    for i in range(5):
        w.append_json(Kind.EVENT, {"i": i})
    w.close()
    assert verify(store, k0).ok
