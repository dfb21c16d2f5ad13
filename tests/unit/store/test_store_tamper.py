"""Every change to a sealed store is detected, and located at its first frame."""

from __future__ import annotations

import random
import shutil

import orjson
import pytest

from agent.store import Kind, SealKey, StoreWriter, verify
from agent.store.format import HEADER_SIZE, segment_name
from agent.store import keys, seal as sealing
from store_forge import as_tuples, build_store, flip, frame_spans, rewrite, segments


@pytest.fixture
def sealed(tmp_path):
    store, k0 = build_store(tmp_path)
    assert verify(store, k0).ok
    return store, k0


def _positions(spans, rng):
    """Per frame: bytes of header, payload and crc; seals get more. >= 512 in all."""
    picks = []
    for name, start, end, rec in spans:
        per = 8 if rec.kind == Kind.SEAL else 4
        regions = [(start, start + HEADER_SIZE), (start + HEADER_SIZE, end - 4), (end - 4, end)]
        for lo, hi in regions:
            if hi > lo:
                picks += [(name, start, rng.randrange(lo, hi)) for _ in range(per)]
    return picks


def test_every_single_bit_flip_is_detected_and_located(sealed):
    store, k0 = sealed
    spans = frame_spans(store)
    picks = _positions(spans, random.Random(4))
    assert len(picks) >= 512
    assert {r.kind for *_, r in spans} >= {Kind.SEAL, Kind.DATA, Kind.SEGMENT_START}
    for i, (name, frame_start, pos) in enumerate(picks):
        bit = i % 8
        flip(store / name, pos, bit)
        try:
            r = verify(store, k0)
        finally:
            flip(store / name, pos, bit)
        assert not r.ok, (name, pos)
        f = r.failures[0]
        assert (f.segment, f.offset) == (name, frame_start), (pos, f)
    assert verify(store, k0).ok


def test_deleted_middle_segment(sealed):
    store, k0 = sealed
    (store / segments(store)[1][0].segment).unlink()
    r = verify(store, k0)
    assert not r.ok and r.failures[0].segment == segments(store)[1][0].segment


def test_deleted_first_segment_without_gc_record(sealed):
    store, k0 = sealed
    first = segments(store)[0][0].segment
    (store / first).unlink()
    r = verify(store, k0)
    assert not r.ok and "no gc record" in r.failures[0].reason


def test_reordered_segments(sealed):
    store, k0 = sealed
    a, b = (segs[0].segment for segs in segments(store)[1:3])
    (store / a).rename(store / "swap")
    (store / b).rename(store / a)
    (store / "swap").rename(store / b)
    r = verify(store, k0)
    assert not r.ok and r.failures[0].segment == a


def test_duplicated_segment(sealed):
    store, k0 = sealed
    segs = segments(store)
    dup = segment_name(segs[-1][-1].seq + 1)
    shutil.copy(store / segs[1][0].segment, store / dup)
    r = verify(store, k0)
    assert not r.ok and r.failures[0].segment == dup


def test_segment_spliced_from_another_store(tmp_path, sealed):
    store, k0 = sealed
    other, _ = build_store(tmp_path / "other")
    victim = segments(store)[1][0].segment
    shutil.copy(other / victim, store / victim)
    r = verify(store, k0)
    assert not r.ok and r.failures[0].segment == victim
    assert "belongs to store" in r.failures[0].reason


def test_dropped_record_rechained_without_key(sealed):
    store, k0 = sealed
    segs = segments(store)
    victim = next(r for r in segs[1] if r.kind == Kind.DATA)
    rewrite(store, [[t for r, t in zip(seg, as_tuples([seg])[0]) if r is not victim]
                    for seg in segs])
    assert verify(store).ok  # structurally whole: only the key can tell
    r = verify(store, k0)
    assert not r.ok and "MAC" in r.failures[0].reason
    first_seal_after = next(rec for seg in segments(store) for rec in seg
                            if rec.kind == Kind.SEAL and rec.seq >= victim.seq)
    assert r.failures[0].seq == first_seal_after.seq


def _alter_and_reseal(store, k0, make_seal):
    """Change a DATA record covered by the 3rd seal, re-chain, then re-make every
    seal from there with make_seal(epoch, upto, head, ts, store_id) -> payload."""
    segs = as_tuples(segments(store))
    flat = [t for seg in segs for t in seg]
    seal_idx = [i for i, t in enumerate(flat) if t[0] == Kind.SEAL]
    target = next(i for i in range(seal_idx[1] + 1, seal_idx[2]) if flat[i][0] == Kind.DATA)
    kind, ts, payload = flat[target]
    flat[target] = (kind, ts, payload[:-1] + b"!")
    sid = (store / "store.id").read_text().strip()
    # re-chain and re-seal in one pass: seals need the heads before them
    from agent.store.format import ZERO_HASH, encode_header, frame_digest
    head, seq, out = ZERO_HASH, 0, []
    for kind, ts, payload in flat:
        if kind == Kind.SEAL and seq > target:
            epoch = orjson.loads(payload)["epoch"]
            payload = make_seal(epoch, seq - 1, head, ts, sid)
        head, _ = frame_digest(encode_header(kind, len(payload), seq, ts, head), payload)
        out.append((kind, ts, payload))
        seq += 1
    it = iter(out)
    rewrite(store, [[next(it) for _ in seg] for seg in segs])
    return seal_idx


def test_reseal_with_older_epoch_key_fails(sealed):
    store, k0 = sealed
    k1 = keys.next_key(k0)  # say the intruder stole epoch 1's key back then

    def forge(epoch, upto, head, ts, sid):
        return sealing.seal_payload(keys.mac_key(k1), keys.key_id(k0), sid, epoch, upto, head, ts)
    _alter_and_reseal(store, k0, forge)
    r = verify(store, k0)
    assert not r.ok and "MAC" in r.failures[0].reason


def test_reseal_with_current_key_cannot_reuse_past_epochs(tmp_path, sealed):
    store, k0 = sealed
    current = SealKey(tmp_path / "keys" / "seal.key")  # what an intruder finds on the host
    assert current.epoch > 3
    mk, now = current.mac_key(), current.epoch

    def relabel(epoch, upto, head, ts, sid):  # keep the old epoch numbers, current key
        return sealing.seal_payload(mk, current.key_id, sid, epoch, upto, head, ts)
    _alter_and_reseal(store, k0, relabel)
    assert "MAC" in verify(store, k0).failures[0].reason

    store2, k0b = build_store(tmp_path / "b")
    cur2 = SealKey(tmp_path / "b" / "keys" / "seal.key")
    counter = iter(range(cur2.epoch, cur2.epoch + 100))

    def renumber(epoch, upto, head, ts, sid):  # honest epochs from now on: a gap
        return sealing.seal_payload(cur2.mac_key(), cur2.key_id, sid, next(counter), upto, head, ts)
    _alter_and_reseal(store2, k0b, renumber)
    r = verify(store2, k0b)
    assert not r.ok and "does not follow" in r.failures[0].reason


def test_wrong_verification_key(sealed, tmp_path):
    store, _ = sealed
    r = verify(store, keys.init_key(tmp_path / "other.key"))
    assert not r.ok and "not the given key" in r.failures[0].reason


def test_report_covers_the_store(sealed):
    store, k0 = sealed
    r = verify(store, k0)
    assert r.ok and r.keyed and r.first_seq == 0 and r.first_epoch == 0
    assert r.last_seq == segments(store)[-1][-1].seq
    assert r.sealed_upto == r.last_seq - 1  # close() sealed everything
    assert r.seals == r.last_epoch + 1
    assert [s.first_seq for s in r.segments] == sorted(s.first_seq for s in r.segments)
    assert len(r.segments) >= 3
    assert orjson.dumps(r.to_json())
