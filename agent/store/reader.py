"""Reading segments back: frame by frame, checking length, crc and chain."""

from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple

from agent.store.format import (
    CRC, HEADER, HEADER_SIZE, MAGIC, UNWRITTEN, MAX_PAYLOAD, READABLE_VERSIONS, ZERO_HASH,
    Kind, Record, frame_hash,
)

_KINDS = frozenset(int(k) for k in Kind)


class StoreCorrupt(Exception):
    """A frame that is not whole or does not chain; says where."""

    def __init__(self, segment: str, offset: int, seq: int | None, reason: str):
        super().__init__(f"{segment}@{offset} (seq {seq}): {reason}")
        self.segment, self.offset, self.seq, self.reason = segment, offset, seq, reason


@dataclass(frozen=True, slots=True)
class Tail:
    """Where a segment's whole records end, and why reading stopped."""
    end: int            # offset just past the last whole record
    last_seq: int       # -1 when the segment holds no whole record
    last_hash: bytes
    torn: str | None    # None when the segment ends exactly on a record


def segment_paths(store_dir: str | os.PathLike) -> list[Path]:
    return sorted(Path(store_dir).glob("*.seg"))


def unwritten(buf: memoryview, off: int) -> bool:
    """Only zeros from off on: space the writer preallocated for records
    (a frame's first byte is written last, so a frame being written shows
    its other bytes after a zero and is not unwritten)."""
    rest = buf[off:]
    return bytes(rest).count(0) == len(rest)


class Frame(NamedTuple):
    """One whole frame, as check_frame found it in a buffer."""
    ver: int
    kind: int
    seq: int
    ts_ns: int
    prev: bytes
    header: memoryview
    payload: memoryview
    end: int            # just past its crc: where the next frame starts

    def hash(self) -> bytes:
        return frame_hash(self.header, self.payload)


def check_frame(buf: memoryview, off: int) -> Frame | str:
    """The frame at off if it is whole (magic, version, length, crc32, a
    known kind), else why not: the first check it fails."""
    if len(buf) - off < HEADER_SIZE:
        return "short header"
    if buf[off] == UNWRITTEN:
        return "no header"
    magic, ver, kind, length, seq, ts, prev = HEADER.unpack_from(buf, off)
    if magic != MAGIC or ver not in READABLE_VERSIONS:
        return "bad magic or version"
    if length > MAX_PAYLOAD:
        return "length out of range"
    end = off + HEADER_SIZE + length
    if end + CRC.size > len(buf):
        return "short payload"
    if zlib.crc32(buf[off:end]) != CRC.unpack_from(buf, end)[0]:
        return "crc mismatch"
    if kind not in _KINDS:
        return f"unknown kind {kind}"
    return Frame(ver, kind, seq, ts, prev, buf[off:off + HEADER_SIZE],
                 buf[off + HEADER_SIZE:end], end + CRC.size)


def read_frame(buf: memoryview, off: int, name: str) -> tuple[Record | None, str | None]:
    """The record at off: (record, None), or (None, why it is not whole)."""
    f = check_frame(buf, off)
    if isinstance(f, str):
        return None, f
    return Record(f.seq, f.ts_ns, Kind(f.kind), f.prev, bytes(f.payload), f.hash(), name, off,
                  f.ver), None


def written_end(path: Path, start: int = 0) -> int:
    """Where the frames of a segment end, walking their headers from start
    (a frame boundary) without checking them: what a poller asks to learn
    whether anything was appended (the size says nothing while the writer
    preallocates)."""
    off = start
    with open(path, "rb", buffering=0) as f:
        while len(head := os.pread(f.fileno(), HEADER_SIZE, off)) == HEADER_SIZE:
            magic, _ver, _kind, length, *_ = HEADER.unpack(head)
            if magic != MAGIC:
                break
            off += HEADER_SIZE + length + CRC.size
    return off


def scan_segment(path: Path, prev_hash: bytes | None = None,
                 expect_seq: int | None = None) -> Iterator[Record | Tail]:
    """Yield each whole record of one segment, then its Tail. Zeros after
    the last record are where the writer had not written yet, not a tear.

    With prev_hash/expect_seq given, a record that does not chain on is where
    the whole part ends (reason in Tail.torn).
    """
    data = path.read_bytes()
    buf = memoryview(data)
    off, last_seq, last_hash = 0, -1, prev_hash or ZERO_HASH
    torn = None
    while off < len(buf):
        rec, why = read_frame(buf, off, path.name)
        if rec is None:
            torn = None if unwritten(buf, off) else why
            break
        if prev_hash is not None and rec.prev != last_hash:
            torn = "chain broken"
            break
        if expect_seq is not None and rec.seq != expect_seq:
            torn = f"sequence gap: expected {expect_seq}, found {rec.seq}"
            break
        yield rec
        off = rec.offset + HEADER_SIZE + len(rec.payload) + CRC.size
        last_seq, last_hash = rec.seq, rec.hash
        prev_hash = last_hash
        expect_seq = rec.seq + 1
    yield Tail(off, last_seq, last_hash, torn)


def iter_records(store_dir: str | os.PathLike, strict: bool = True,
                 start_seq: int = 0) -> Iterator[Record]:
    """Every record of the store in order, checking crc, chain and sequence.

    strict: a broken frame anywhere but the very end of the last segment
    raises StoreCorrupt (a torn tail of the active segment is normal after a
    crash and is skipped).
    start_seq: yield records from this seq on. Segments are named by their
    first seq, so earlier segments are not read; the chain is checked from
    the start of the first segment read (its link to the one before is not).
    """
    paths = segment_paths(store_dir)
    first = 0
    for i, path in enumerate(paths):
        if int(path.stem) <= start_seq:
            first = i
    prev_hash, expect = (ZERO_HASH, 0) if first == 0 else (None, int(paths[first].stem))
    for i, path in enumerate(paths[first:], first):
        for item in scan_segment(path, prev_hash, expect):
            if isinstance(item, Tail):
                if item.torn and strict and i != len(paths) - 1:
                    raise StoreCorrupt(path.name, item.end, expect, item.torn)
                break
            prev_hash, expect = item.hash, item.seq + 1
            if item.seq >= start_seq:
                yield item
