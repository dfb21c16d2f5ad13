"""Proving a store whole: every frame, link, segment and seal, in one pass.

Checks, in store order, stopping at the first failure (everything after a
break is unproven, so only the first one is exact):
- each frame: magic, version, length, crc32, known kind;
- sequence gap-free from the first record, each prev = hash of the one before;
- segments: named by their first seq, each opened by a SEGMENT_START of this
  store id whose summary of the previous segment matches the real one (so a
  missing, reordered, duplicated or spliced segment is caught);
- a store whose first segment does not start at seq 0 must hold a store_gc
  EVENT naming the segment before it (retention, gc.py);
- seals: epochs go up by exactly one, each covers the chain up to itself,
  times never go back, and with the verification key each MAC is checked
  under the ratchet's key for its epoch (seal.py, keys.py).
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import orjson

from agent.store import seal as sealing
from agent.store.format import ZERO_HASH, Kind, segment_name
from agent.store.immutable import is_immutable
from agent.store.keys import Ratchet
from agent.store.reader import check_frame, unwritten

_SEGMENT_NAME = re.compile(r"^\d{20}\.seg$")
_SHORT = ("short header", "short payload", "no header")  # a frame being written


@dataclass(frozen=True, slots=True)
class Failure:
    segment: str
    offset: int
    seq: int | None
    reason: str


@dataclass(frozen=True, slots=True)
class SegmentInfo:
    name: str
    first_seq: int
    last_seq: int
    records: int
    bytes: int
    immutable: bool


@dataclass(slots=True)
class VerifyReport:
    ok: bool = True
    store_id: str | None = None
    first_seq: int = -1
    last_seq: int = -1
    records: int = 0
    bytes: int = 0
    keyed: bool = False          # seals' MACs were checked against the verification key
    seals: int = 0
    first_epoch: int | None = None
    last_epoch: int | None = None
    sealed_upto: int = -1        # last seq covered by a (checked) seal
    unsealed_records: int = 0    # records after the last seal
    gc_before: int | None = None  # first seq kept when earlier segments were gc'd
    torn_tail: int = 0           # bytes of a partial frame tolerated at the very end
    seconds: float = 0.0
    failures: list[Failure] = field(default_factory=list)
    segments: list[SegmentInfo] = field(default_factory=list)

    def to_json(self) -> dict:
        return asdict(self)


class _Stop(Exception):
    """The first failure: verification ends there."""


class _Verifier:
    def __init__(self, store_dir: Path, key: bytes | None, allow_torn_tail: bool) -> None:
        self.dir = store_dir
        self.ratchet = Ratchet(key) if key is not None else None
        self.allow_torn_tail = allow_torn_tail
        self.report = VerifyReport(keyed=key is not None)
        self.expect_seq: int | None = None
        self.prev_hash = ZERO_HASH
        self.prev_segment: dict | None = None   # summary of the segment just read
        self.gc_anchor: dict | None = None      # the gc'd segment the store starts after
        self.gc_named: set[tuple[str, int, str]] = set()
        self.last_seal: dict | None = None

    def fail(self, segment: str, offset: int, seq: int | None, reason: str) -> None:
        self.report.failures.append(Failure(segment, offset, seq, reason))
        raise _Stop

    def run(self) -> VerifyReport:
        started = time.perf_counter()
        try:
            self.store_id = self._read_store_id()
            paths = self._segment_paths()
            if not paths:
                self.fail("", 0, None, "store holds no segment")
            for i, path in enumerate(paths):
                self._segment(path, last=i == len(paths) - 1)
            self._check_gc_anchor(paths[0].name)
        except _Stop:
            pass
        r = self.report
        r.ok = not r.failures
        r.store_id = self.store_id if hasattr(self, "store_id") else None
        r.unsealed_records = r.last_seq - r.sealed_upto if r.records else 0
        r.seconds = time.perf_counter() - started
        return r

    def _read_store_id(self) -> str | None:
        try:
            return (self.dir / "store.id").read_text().strip()
        except FileNotFoundError:
            return None  # then the first segment's id is the store's
        except OSError as e:
            self.fail("store.id", 0, None, f"cannot read: {e.strerror}")

    def _segment_paths(self) -> list[Path]:
        try:
            names = sorted(n for n in os.listdir(self.dir) if n.endswith(".seg"))
        except OSError as e:
            self.fail("", 0, None, f"cannot list the store: {e.strerror}")
        for n in names:
            if not _SEGMENT_NAME.match(n):
                self.fail(n, 0, None, "not a segment name (20-digit first seq + .seg)")
        return [self.dir / n for n in names]

    # -- one segment -------------------------------------------------------------

    def _segment(self, path: Path, last: bool) -> None:
        name = path.name
        try:
            data = path.read_bytes()
        except OSError as e:
            self.fail(name, 0, self.expect_seq, f"cannot read: {e.strerror}")
        buf = memoryview(data)
        off, first_seq, records = 0, None, 0
        while off < len(buf):
            seq, kind, payload, end = self._frame(buf, off, name, last)
            if end is None:
                break
            if off == 0:
                self._segment_start(name, seq, kind, payload)
                first_seq = seq
            elif kind == Kind.SEGMENT_START:
                self.fail(name, off, seq, "segment start in the middle of a segment")
            elif kind == Kind.SEAL:
                self._seal(name, off, seq, payload)
            elif kind == Kind.EVENT and b'"store_gc"' in bytes(payload[:40]):
                self._gc_event(payload)
            off, records = end, records + 1
        if first_seq is None:
            if last and self.allow_torn_tail:
                return  # created, crash before its first record: the writer redoes it
            self.fail(name, 0, self.expect_seq, "empty segment")
        r = self.report
        r.bytes += off
        r.segments.append(SegmentInfo(name, first_seq, r.last_seq, records, off,
                                      is_immutable(path)))
        self.prev_segment = {"segment": name, "first_seq": first_seq, "last_seq": r.last_seq,
                             "bytes": off, "head": self.prev_hash.hex()}

    def _frame(self, buf: memoryview, off: int, name: str, last: bool):
        """Check one frame; (seq, kind, payload, end), end None for a tolerated torn tail."""
        expect = self.expect_seq
        f = check_frame(buf, off)
        if isinstance(f, str):
            if last and unwritten(buf, off):
                return None, None, None, None  # preallocated, the records end here
            if last and f in _SHORT and self.allow_torn_tail:
                # the partial frame, not the preallocated zeros after it
                self.report.torn_tail = len(bytes(buf[off:]).rstrip(b"\0"))
                return None, None, None, None
            self.fail(name, off, expect, f)
        if expect is not None and f.seq != expect:
            self.fail(name, off, expect, f"sequence: expected {expect}, found {f.seq}")
        if expect is not None and f.prev != self.prev_hash and off > 0:
            self._chain_broken(name, off, f.seq)
        # at a segment's start the link is checked after its store id and name,
        # which say more precisely what happened
        self.linked = expect is None or f.prev == self.prev_hash
        self.prev_hash = f.hash()
        self.frame_ts, self.frame_prev = f.ts_ns, f.prev
        r = self.report
        if r.first_seq < 0:
            r.first_seq = f.seq
        r.last_seq, r.records = f.seq, r.records + 1
        self.expect_seq = f.seq + 1
        return f.seq, f.kind, f.payload, f.end

    def _segment_start(self, name: str, seq: int, kind: int, payload: memoryview) -> None:
        if kind != Kind.SEGMENT_START:
            self.fail(name, 0, seq, "segment does not begin with a segment start")
        if name != segment_name(seq):
            self.fail(name, 0, seq, f"segment name does not match its first seq {seq}"
                                    " (renamed, reordered or duplicated)")
        try:
            start = orjson.loads(payload)
            sid, previous = start["store_id"], start["previous"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            self.fail(name, 0, seq, "malformed segment start")
        if self.store_id is None:
            self.store_id = sid
        if sid != self.store_id:
            self.fail(name, 0, seq, f"segment belongs to store {sid}, not {self.store_id}")
        if not self.linked:
            self._chain_broken(name, 0, seq)
        if self.prev_segment is None:
            self._first_segment(name, seq, previous, start.get("last_seal"))
        elif previous != self.prev_segment:
            self.fail(name, 0, seq, "previous-segment summary does not match the segment before"
                                    " (missing, reordered or altered segment)")

    def _chain_broken(self, name: str, off: int, seq: int) -> None:
        self.fail(name, off, seq, "chain broken: prev is not the hash of the record before")

    def _first_segment(self, name: str, seq: int, previous: dict | None,
                       last_seal: dict | None) -> None:
        """The store's first record: seq 0 from nothing, or after gc'd segments."""
        if previous is None:
            if seq != 0 or self.frame_prev != ZERO_HASH:
                self.fail(name, 0, seq, "first segment starts after seq 0 with no predecessor")
            return
        try:
            ok = (previous["last_seq"] + 1 == seq and
                  self.frame_prev == bytes.fromhex(previous["head"]))
        except (KeyError, TypeError, ValueError):
            ok = False
        if not ok:
            self.fail(name, 0, seq, "first segment does not chain to the summary it carries")
        self.gc_anchor = previous
        self.report.gc_before = seq
        if last_seal:
            self.last_seal = last_seal

    # -- seals and gc --------------------------------------------------------------

    def _seal(self, name: str, off: int, seq: int, payload: memoryview) -> None:
        try:
            s = sealing.parse_seal(bytes(payload))
        except ValueError as e:
            self.fail(name, off, seq, str(e))
        if s["upto_seq"] != seq - 1 or s["head"] != self.frame_prev:
            self.fail(name, off, seq, "seal does not cover the chain up to itself")
        ts, last = self.frame_ts, self.last_seal
        if last is not None and s["epoch"] != last["epoch"] + 1:
            self.fail(name, off, seq, f"seal epoch {s['epoch']} does not follow {last['epoch']}"
                                      " (seal missing, replayed, or made with an older key)")
        if last is not None and ts < last["ts"]:
            self.fail(name, off, seq, "seal time goes back")
        if self.ratchet is not None:
            self._check_mac(name, off, seq, s, ts)
        r = self.report
        if r.first_epoch is None:
            r.first_epoch = s["epoch"]
        r.last_epoch, r.seals, r.sealed_upto = s["epoch"], r.seals + 1, s["upto_seq"]
        self.last_seal = {"epoch": s["epoch"], "seq": seq, "ts": ts}

    def _check_mac(self, name: str, off: int, seq: int, s: dict, ts: int) -> None:
        if s["key_id"] != self.ratchet.key_id:
            self.fail(name, off, seq, f"sealed with key {s['key_id'].hex()}, not the given key"
                                      f" {self.ratchet.key_id.hex()}")
        try:
            mk = self.ratchet.mac_key(s["epoch"])
        except ValueError as e:
            self.fail(name, off, seq, str(e))
        if not sealing.mac_ok(s, mk, self.store_id, ts):
            self.fail(name, off, seq, "seal MAC does not match: records before it were changed"
                                      " or the seal was forged")

    def _gc_event(self, payload: memoryview) -> None:
        try:
            obj = orjson.loads(payload)
            for d in obj.get("deleted", ()):
                self.gc_named.add((d["segment"], d["last_seq"], d["head"]))
        except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
            pass  # a malformed gc event names nothing, so it cannot excuse a missing segment

    def _check_gc_anchor(self, first_name: str) -> None:
        a = self.gc_anchor
        if a is None:
            return
        if (a.get("segment"), a.get("last_seq"), a.get("head")) not in self.gc_named:
            self.fail(first_name, 0, self.report.gc_before,
                      f"segments before {first_name} are missing and no gc record names them")


def verify(store_dir: str | os.PathLike, key: bytes | None = None, *,
           allow_torn_tail: bool = False) -> VerifyReport:
    """Check the whole store; the report says what was proven and the first failure.

    key: the verification key (k_0, keys.load_verification_key); without it
    seals are checked for structure only (report.keyed is False).
    allow_torn_tail: tolerate a partial last frame (a live store mid-append).
    """
    return _Verifier(Path(store_dir), key, allow_torn_tail).run()
