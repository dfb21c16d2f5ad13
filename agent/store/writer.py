"""Appending records: one writer per store, many callers, one lock.

Invariant 1 (record before forward) rests on append() returning only when
the frame is in the page cache (durability "write") or is queued for the next
group fsync (durability "fsync"; callers wait on wait_durable()).
"""

from __future__ import annotations

import os
import secrets
import threading
import time
from pathlib import Path

import orjson

from agent.store.format import (
    FRAME_OVERHEAD, MAX_PAYLOAD, ZERO_HASH, Direction, Kind, data_payload_head,
    encode_header, frame_digest, segment_name,
)
from agent.store.reader import Tail, scan_segment, segment_paths


class StoreError(Exception):
    """An append failed: the caller must cut what depends on it (fail closed)."""


class StoreWriter:
    def __init__(self, store_dir: str | os.PathLike, *,
                 segment_max_bytes: int = 64 << 20, durability: str = "write"):
        self.dir = Path(store_dir)
        self.segment_max_bytes = segment_max_bytes
        self.durability = durability
        self._lock = threading.Lock()
        self._fd = -1
        self._seg_bytes = 0
        self._next_seq = 0
        self._head = ZERO_HASH
        self._synced_seq = -1
        self.appended_records = 0
        self.appended_bytes = 0
        self._open()

    # -- opening and recovery ------------------------------------------------

    def _open(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.store_id = self._load_store_id()
        paths = segment_paths(self.dir)
        if not paths:
            self._start_segment(prev_segment=None)
            return
        last = paths[-1]
        prev_hash, expect = self._chain_before(paths)
        tail = self._tail_of(last, prev_hash, expect)
        self._fd = os.open(last, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._seg_path = last
        self._seg_bytes = tail.end
        size = os.fstat(self._fd).st_size
        if tail.last_seq >= 0:
            self._next_seq, self._head = tail.last_seq + 1, tail.last_hash
        if size > tail.end:
            # A torn tail: cut it back to the last whole record, then say so.
            os.ftruncate(self._fd, tail.end)
            os.fsync(self._fd)
            self.append_json(Kind.RECOVERED, {
                "segment": last.name, "kept_bytes": tail.end,
                "dropped_bytes": size - tail.end, "reason": tail.torn})

    def _chain_before(self, paths: list[Path]) -> tuple[bytes, int]:
        """Chain head and next seq at the start of the last segment."""
        if len(paths) < 2:
            return ZERO_HASH, 0
        tail = self._tail_of(paths[-2], None, None)
        return tail.last_hash, tail.last_seq + 1

    @staticmethod
    def _tail_of(path: Path, prev_hash: bytes | None, expect: int | None) -> Tail:
        for item in scan_segment(path, prev_hash, expect):
            if isinstance(item, Tail):
                return item
        raise AssertionError("scan_segment always ends with a Tail")

    def _load_store_id(self) -> str:
        p = self.dir / "store.id"
        try:
            return p.read_text().strip()
        except FileNotFoundError:
            sid = secrets.token_hex(16)
            tmp = p.with_suffix(".tmp")
            tmp.write_text(sid + "\n")
            os.replace(tmp, p)
            return sid

    def _start_segment(self, prev_segment: dict | None) -> None:
        path = self.dir / segment_name(self._next_seq)
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_EXCL
                           | os.O_CLOEXEC, 0o600)
        self._seg_path = path
        self._seg_bytes = 0
        self._append_locked(Kind.SEGMENT_START, orjson.dumps(
            {"store_id": self.store_id, "previous": prev_segment}), time.time_ns())

    def _rotate(self) -> None:
        os.fsync(self._fd)
        os.close(self._fd)
        prev = {"segment": self._seg_path.name, "bytes": self._seg_bytes,
                "last_seq": self._next_seq - 1, "head": self._head.hex()}
        self._start_segment(prev)

    # -- appending -------------------------------------------------------------

    def append(self, kind: Kind, payload: bytes | memoryview, ts_ns: int | None = None,
               prefix: bytes = b"") -> int:
        """Append one record; returns its seq. Raises StoreError on any failure."""
        ts = ts_ns if ts_ns is not None else time.time_ns()
        with self._lock:
            if self._seg_bytes >= self.segment_max_bytes:
                self._guard(self._rotate)
            return self._append_locked(kind, payload, ts, prefix)

    def _append_locked(self, kind: Kind, payload, ts: int, prefix: bytes = b"") -> int:
        length = len(prefix) + len(payload)
        if length > MAX_PAYLOAD:
            raise StoreError(f"record of {length} bytes exceeds {MAX_PAYLOAD}")
        seq = self._next_seq
        header = encode_header(kind, length, seq, ts, self._head)
        parts = [header, prefix, payload] if prefix else [header, payload]
        digest, crc = frame_digest(*parts)
        parts.append(crc)
        self._guard(self._write_all, parts)
        self._head, self._next_seq = digest, seq + 1
        self._seg_bytes += length + FRAME_OVERHEAD
        self.appended_records += 1
        self.appended_bytes += length + FRAME_OVERHEAD
        return seq

    def _write_all(self, parts: list[bytes]) -> None:
        total = sum(len(p) for p in parts)
        written = os.writev(self._fd, parts)
        if written != total:
            # A short write leaves a torn frame; cut it so the file stays whole.
            os.ftruncate(self._fd, self._seg_bytes)
            raise OSError(f"short write: {written} of {total} bytes")

    @staticmethod
    def _guard(fn, *args):
        try:
            return fn(*args)
        except OSError as e:
            raise StoreError(f"store append failed: {e.strerror or e}") from e

    def append_json(self, kind: Kind, obj: dict, ts_ns: int | None = None) -> int:
        return self.append(kind, orjson.dumps(obj), ts_ns)

    def append_data(self, session_id: int, direction: Direction, data: bytes,
                    ts_ns: int | None = None) -> int:
        return self.append(Kind.DATA, data, ts_ns, data_payload_head(session_id, direction))

    # -- durability ------------------------------------------------------------

    def sync(self) -> int:
        """fsync everything appended so far; returns the last durable seq."""
        with self._lock:
            upto = self._next_seq - 1
            fd = self._fd
        self._guard(os.fsync, fd)
        self._synced_seq = max(self._synced_seq, upto)
        return self._synced_seq

    @property
    def head(self) -> tuple[int, bytes]:
        return self._next_seq - 1, self._head

    def statistics(self) -> dict:
        return {"records": self.appended_records, "bytes": self.appended_bytes,
                "next_seq": self._next_seq, "segment": self._seg_path.name,
                "synced_seq": self._synced_seq, "durability": self.durability}

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                os.close(self._fd)
                self._fd = -1
