"""Appending records: one writer per store, many callers, one lock.

Invariant 1 (record before forward) rests on append() returning only when
the frame is in the page cache (durability "write"); in "fsync" mode callers
then await GroupCommit.durable(seq) (commit.py).

Besides appending, the writer keeps the store whole:
- on open it cuts a torn tail back to the last whole record (length, crc,
  chain), keeps the cut bytes beside the segment and records RECOVERED;
- it rotates segments by size and age; a finished segment is fsynced, made
  immutable, and summarised (head, last seq, bytes) in the next SEGMENT_START;
- it seals (seal.py) every seal_interval_s or seal_interval_bytes;
- a failed append leaves no partial frame, flips `healthy` off, and keeps
  records the caller defers (alerts) in memory until probe() or the next
  append succeeds, which writes them first, then a store_recovered EVENT.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import secrets
import select
import threading
import time
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import orjson

from agent.native import APPEND_MANY_MAX, Chain
from agent.store import seal as sealing
from agent.store.format import (
    MAX_PAYLOAD, PAYLOAD_HASH_VERSION, ZERO_HASH, Direction, Kind, Record, data_payload_head,
    segment_name,
)
from agent.store.immutable import probe as probe_immutable, set_immutable
from agent.store.keys import SealKey
from agent.store.reader import Tail, scan_segment, segment_paths


UPKEEP_IDLE_S = 5.0  # the longest the upkeep thread sleeps with nothing timed to do


class StoreError(Exception):
    """An append failed: the caller must cut what depends on it (fail closed)."""


class StoreSettings(Protocol):
    """The StoreConfig fields the writer reads (the store imports no config)."""
    path: str
    durability: str
    payload_hash: str
    segment_max_bytes: int
    segment_max_age_s: float
    seal_interval_s: float
    seal_interval_bytes: int
    key_path: str


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _OnChain:
    """A writer field kept in the native chain, which relay threads append to."""

    def __init__(self, name: str, kind: type = int) -> None:
        self.name, self.kind = name, kind

    def __get__(self, writer: "StoreWriter", owner: type) -> Any:
        return self.kind(getattr(writer._chain, self.name))

    def __set__(self, writer: "StoreWriter", value: Any) -> None:
        setattr(writer._chain, self.name, value)


def _check_length(length: int) -> None:
    """A record too big for the format is the caller's error, as StoreError
    (the chain would refuse it with a ValueError)."""
    if length > MAX_PAYLOAD:
        raise StoreError(f"record of {length} bytes exceeds {MAX_PAYLOAD}")


class StoreWriter:
    # The append point and its state live in C (agent/native/chain.c): the
    # relay threads of the native data plane append there without the GIL.
    _fd = _OnChain("fd")
    _seg_bytes = _OnChain("seg_bytes")
    _next_seq = _OnChain("next_seq")
    _head = _OnChain("head", bytes)
    _seal_bytes = _OnChain("seal_bytes")
    appended_records = _OnChain("records")
    appended_bytes = _OnChain("bytes")
    healthy = _OnChain("healthy", bool)

    def __init__(self, store_dir: str | os.PathLike, *,
                 segment_max_bytes: int = 64 << 20, durability: str = "write",
                 segment_max_age_s: float | None = None, seal_key: SealKey | None = None,
                 seal_interval_s: float = 1.0, seal_interval_bytes: int = 1 << 20,
                 immutable: bool = True, max_deferred: int = 10_000,
                 maintain_interval_s: float | None = None, payload_hash: str = "blake3"):
        self.dir = Path(store_dir)
        self.segment_max_bytes = segment_max_bytes
        self.segment_max_age_ns = int(segment_max_age_s * 1e9) if segment_max_age_s else None
        self.durability = durability
        self.seal_key = seal_key
        self.seal_interval_ns = int(seal_interval_s * 1e9)
        self.seal_interval_bytes = seal_interval_bytes
        self.immutable = immutable
        # The chain is also the writer's lock: holding it excludes relay threads too.
        self._chain = self._lock = Chain()
        self._chain.version = PAYLOAD_HASH_VERSION[payload_hash]
        self._wake = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        self._chain.wake_fd = self._wake
        self._chain.seg_max = segment_max_bytes
        if seal_key is not None:
            self._chain.seal_every = seal_interval_bytes
        self._seal_lock = threading.Lock()   # one key ratchet at a time
        self._seg_path = Path()
        self._seg_started_ns = time.time_ns()
        self._synced_seq = -1
        self.fsyncs = 0
        self.last_error: str | None = None
        self._failed_at_ns = 0
        self._failures = 0
        self._deferred: collections.deque[tuple[Kind, bytes]] = collections.deque()
        self._max_deferred = max_deferred
        self._deferred_dropped = 0
        self.immutable_error: str | None = None if immutable else "disabled by the caller"
        self._immutable_set = 0
        self._last_seal: dict | None = None  # {"epoch", "seq", "ts"} of the newest seal
        self._pending_ratchet: int | None = None  # seq of a seal whose key the file still holds
        # monotonic; the file's key moves once per seal interval. None, not 0:
        # the first erase waits for nothing (monotonic time starts at boot).
        self._key_persisted_ns: int | None = None
        self._seal_at_ns = time.monotonic_ns()
        self.seals = 0
        self.recovered: dict | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._finishing: threading.Thread | None = None  # see _rotate
        self._open()
        if maintain_interval_s:
            self.start_maintenance(maintain_interval_s)

    @classmethod
    def from_config(cls, cfg: StoreSettings, *, maintain_interval_s: float = 0.1) -> "StoreWriter":
        """The writer as the daemon runs it: sealing when the key exists, upkeep thread on."""
        key = SealKey(cfg.key_path) if Path(cfg.key_path).exists() else None
        return cls(cfg.path, segment_max_bytes=cfg.segment_max_bytes,
                   durability=cfg.durability, payload_hash=cfg.payload_hash,
                   segment_max_age_s=cfg.segment_max_age_s,
                   seal_key=key, seal_interval_s=cfg.seal_interval_s,
                   seal_interval_bytes=cfg.seal_interval_bytes,
                   maintain_interval_s=maintain_interval_s)

    # -- opening and recovery ------------------------------------------------

    def _open(self) -> None:
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        os.chmod(self.dir, 0o700)
        self.store_id = self._load_store_id()
        if self.immutable:
            self.immutable_error = probe_immutable(self.dir)
        paths = segment_paths(self.dir)
        if not paths:
            self._create_segment(previous=None)
            return
        if len(paths) > 1:
            self._make_immutable(paths[-2])  # a crash may have come mid-rotation
        last = paths[-1]
        set_immutable(last, False)
        tail, first, last_seal = self._scan_last(last)
        if first is None:
            self._restart_empty_segment(paths, tail)
            return
        self._seg_started_ns = first.ts_ns
        self._next_seq, self._head = tail.last_seq + 1, tail.last_hash
        self._last_seal = last_seal or orjson.loads(first.payload).get("last_seal")
        self._fd = self._open_append(last)
        self._seg_path, self._seg_bytes = last, tail.end
        if tail.torn:
            self._cut_torn_tail(tail)
        else:
            self._chain.trim()  # space preallocated for records, never written
        self._synced_seq = self._next_seq - 1 if self.recovered else -1
        self._resume_key()

    def _scan_last(self, path: Path) -> tuple[Tail, Record | None, dict | None]:
        """Whole part of the active segment: its tail, first record, newest seal.

        The first record must be a SEGMENT_START with the seq the name says;
        after it each record must chain on (scan_segment checks from there).
        """
        first = last_seal = None
        for item in scan_segment(path, None, int(path.stem)):
            if isinstance(item, Tail):
                tail = item
            elif first is None and item.kind != Kind.SEGMENT_START:
                tail = Tail(0, -1, ZERO_HASH, "first record is not a segment start")
                break
            else:
                first = first or item
                if item.kind == Kind.SEAL:
                    last_seal = self._seal_state(item) or last_seal
        return tail, first, last_seal

    @staticmethod
    def _seal_state(rec: Record) -> dict | None:
        try:
            s = sealing.parse_seal(rec.payload)
        except ValueError:
            return None  # verify reports it; the writer just carries on from the last good one
        return {"epoch": s["epoch"], "seq": rec.seq, "ts": rec.ts_ns, "key_id": s["key_id"].hex()}

    def _restart_empty_segment(self, paths: list[Path], tail: Tail) -> None:
        """The active segment holds no whole record: rebuild its SEGMENT_START."""
        last = paths[-1]
        previous = None
        if len(paths) > 1:
            prev = paths[-2]
            ptail, pfirst, pseal = self._scan_last(prev)
            self._next_seq, self._head = ptail.last_seq + 1, ptail.last_hash
            self._last_seal = pseal or orjson.loads(pfirst.payload).get("last_seal")
            previous = self._summary(prev, int(prev.stem), ptail.end)
        self._fd = self._open_append(last)
        self._seg_path, self._seg_bytes = last, 0
        if tail.torn:
            self._cut_torn_tail(tail, previous=previous)
        else:
            self._chain.trim()  # only preallocated zeros
            self._append_locked(Kind.SEGMENT_START, self._start_payload(previous), time.time_ns())
        self._resume_key()

    def _cut_torn_tail(self, tail: Tail, previous: dict | None = None) -> None:
        """Keep the torn bytes beside the segment (evidence), cut, then say so.
        The caller has set the chain's seg_bytes to tail.end."""
        path = self._seg_path
        torn = path.read_bytes()[tail.end:]
        keep = path.with_name(f"{path.name}.torn-{time.time_ns()}")
        fd = os.open(keep, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        try:
            os.write(fd, torn)
            os.fsync(fd)
        finally:
            os.close(fd)
        self._chain.trim()   # to tail.end, where the segment's whole records end
        os.fsync(self._fd)
        fsync_dir(self.dir)
        if tail.end == 0:
            self._append_locked(Kind.SEGMENT_START, self._start_payload(previous), time.time_ns())
        self.recovered = {"segment": path.name, "kept_bytes": tail.end,
                          "dropped_bytes": len(torn), "reason": tail.torn,
                          # most of them, after a crash mid-append: preallocated space
                          "trailing_zero_bytes": len(torn) - len(torn.rstrip(b"\0")),
                          "dropped_sha256": hashlib.sha256(torn).hexdigest(),
                          "saved_as": keep.name}
        self._append_locked(Kind.RECOVERED, orjson.dumps(self.recovered), time.time_ns())

    def _resume_key(self) -> None:
        """After a crash the newest seal may be on disk with its key not yet erased."""
        ls, key = self._last_seal, self.seal_key
        if key and ls and ls.get("key_id") == key.key_id.hex() and ls["epoch"] >= key.epoch:
            key.advance(ls["epoch"] + 1)

    @staticmethod
    def _open_append(path: Path) -> int:
        # Read-write, not O_APPEND: the chain maps the segment and writes at
        # the end of its records, ahead of which it preallocates (chain.c).
        return os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def _load_store_id(self) -> str:
        p = self.dir / "store.id"
        try:
            return p.read_text().strip()
        except FileNotFoundError:
            sid = secrets.token_hex(16)
            tmp = p.with_suffix(".tmp")
            with open(tmp, "w") as f:
                f.write(sid + "\n")
                os.fsync(f.fileno())  # every segment names it: it must survive a crash
            os.replace(tmp, p)
            fsync_dir(self.dir)
            return sid

    # -- segments ------------------------------------------------------------------

    def _summary(self, path: Path, first_seq: int, size: int | None = None) -> dict:
        return {"segment": path.name, "first_seq": first_seq, "last_seq": self._next_seq - 1,
                "bytes": self._seg_bytes if size is None else size, "head": self._head.hex()}

    def _start_payload(self, previous: dict | None) -> bytes:
        return orjson.dumps({"store_id": self.store_id, "previous": previous,
                             "last_seal": self._last_seal})

    def _create_segment(self, previous: dict | None) -> None:
        """Open the next segment and write its SEGMENT_START; on failure nothing changes."""
        path = self.dir / segment_name(self._next_seq)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        saved = self._fd, self._seg_path, self._seg_bytes, self._seg_started_ns
        self._fd, self._seg_path, self._seg_bytes = fd, path, 0
        self._seg_started_ns = time.time_ns()
        try:
            fsync_dir(self.dir)  # before the first record: a failure must change nothing
            self._append_locked(Kind.SEGMENT_START, self._start_payload(previous),
                                self._seg_started_ns)
        except BaseException:
            os.close(fd)
            path.unlink(missing_ok=True)
            self._fd, self._seg_path, self._seg_bytes, self._seg_started_ns = saved
            raise

    def _rotate(self) -> None:
        """Start the next segment; the finished one is fsynced, closed and made
        immutable. In "write" mode that happens in a thread, so appends go on
        into the page cache while the disk catches up (nothing was promised on
        disk there); at most one finished segment waits, which is what a
        restart checks. In "fsync" mode group commit has promised its records,
        so it is done before the next segment exists."""
        old_fd, old_path, last_seq = self._fd, self._seg_path, self._next_seq - 1
        self._chain.trim()  # a finished segment ends on its last record
        if self.durability == "fsync":
            self._sync_fd(old_fd, last_seq)
        self._create_segment(self._summary(old_path, int(old_path.stem)))
        self._settle()
        if self.durability == "fsync":
            self._close_finished(old_fd, old_path)
            return
        self._finishing = threading.Thread(
            target=self._finish_segment, args=(old_fd, old_path, last_seq),
            name="tollgate-segment-sync", daemon=True)
        self._finishing.start()

    def _finish_segment(self, fd: int, path: Path, last_seq: int) -> None:
        # A failure here has no caller to raise to: it marks the store failed,
        # and the next append records it (store_recovered, with the error).
        try:
            self._sync_fd(fd, last_seq)
        except OSError as e:
            self._failed(e, "fsync of a finished segment")
        try:
            self._close_finished(fd, path)
        except OSError as e:
            self._failed(e, "close of a finished segment")

    def _close_finished(self, fd: int, path: Path) -> None:
        # Evidence is written once and read rarely: once a finished segment
        # is on disk its pages leave the page cache, so the next segments
        # reuse them. Kept, a busy store grows the cache by every byte it
        # records, and new page-cache pages cost more than reused ones (on
        # the bench host writes fell from ~1.8 to ~0.3-0.9 GB/s after 2 GiB).
        with contextlib.suppress(OSError):  # a cache hint: never an evidence failure
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        os.close(fd)
        self._make_immutable(path)

    def _sync_fd(self, fd: int, upto: int) -> None:
        os.fsync(fd)
        self.fsyncs += 1
        self._synced_seq = max(self._synced_seq, upto)

    def _settle(self) -> None:
        """Wait for the finished segment still being synced, if any."""
        t = self._finishing
        if t is not None:
            t.join()

    def _make_immutable(self, path: Path) -> None:
        if not self.immutable:
            return
        self.immutable_error = set_immutable(path, True)
        self._immutable_set += self.immutable_error is None

    # _rotation_due and _seal_due run for every record (three a connection):
    # they read the chain's fields directly, where the _OnChain descriptor
    # read alone cost about as much as the C append itself.
    def _rotation_due(self, now_ns: int) -> bool:
        if self._chain.seg_bytes >= self.segment_max_bytes:
            return True
        return (self.segment_max_age_ns is not None
                and now_ns - self._seg_started_ns >= self.segment_max_age_ns
                and self._segment_has_records())

    def _segment_has_records(self) -> bool:
        """Records after the active segment's SEGMENT_START."""
        return self._next_seq - 1 > int(self._seg_path.stem)

    # -- appending -------------------------------------------------------------

    def append(self, kind: Kind, payload: bytes | memoryview, ts_ns: int | None = None,
               prefix: bytes = b"") -> int:
        """Append one record; returns its seq. Raises StoreError on any failure."""
        ts = ts_ns if ts_ns is not None else time.time_ns()
        with self._lock:
            self._before_append(ts)
            seq = self._guard(self._append_locked, kind, payload, ts, prefix)
            self._after_append()
            return seq

    def append_json_pair(self, kind: Kind, obj: dict, then: Kind,
                         make_then: Callable[[int], dict], ts_ns: int) -> int:
        """obj, then make_then(obj's seq), in one write: both or neither.
        Returns obj's seq. For a session's opening and its process, known
        together: one write instead of two on the per-connection path."""
        with self._lock:
            self._before_append(ts_ns)
            seq = self._chain.next_seq
            self._append_many_locked(
                ((kind, orjson.dumps(obj)), (then, orjson.dumps(make_then(seq)))), ts_ns)
            return seq

    def append_json_many(self, kind: Kind, objs: Sequence[dict],
                         ts_ns: int | None = None) -> None:
        """Records of one kind, APPEND_MANY_MAX to a write (each write all or
        none). For the sessions the relay reports ended together: one call
        and one write for several, not one each."""
        ts = ts_ns if ts_ns is not None else time.time_ns()
        with self._lock:
            for i in range(0, len(objs), APPEND_MANY_MAX):
                self._before_append(ts)
                self._append_many_locked(
                    [(kind, orjson.dumps(o)) for o in objs[i:i + APPEND_MANY_MAX]], ts)

    def _append_many_locked(self, records: Sequence[tuple[Kind, bytes]], ts: int) -> None:
        for _, payload in records:
            _check_length(len(payload))
        self._guard(self._chain.append_many, records, ts)
        self._after_append()

    def _before_append(self, ts: int) -> None:
        # Per record: the checks that are nearly always false come first.
        if not self.healthy or self._deferred:
            self._guard(self._recover_locked)
        if self._rotation_due(ts):
            self._guard(self._rotate)

    def _after_append(self) -> None:
        if self.seal_key is not None:
            self._seal_if_due()

    def _append_locked(self, kind: Kind, payload, ts: int, prefix: bytes = b"") -> int:
        _check_length(len(prefix) + len(payload))
        # chain.c: header, SHA-256, crc, the copy or write; a failed one is cut back
        # to the last whole record (OSError, the chain unchanged).
        return self._chain.append(kind, payload, ts, prefix)

    def _guard(self, fn: Callable, *args: Any) -> Any:
        try:
            return fn(*args)
        except OSError as e:
            raise StoreError(self._failed(e)) from e

    def _failed(self, e: OSError, what: str = "append") -> str:
        why = f"store {what} failed: {e.strerror or e}"
        if not self._failures:
            self._failed_at_ns = time.time_ns()
        self.healthy, self.last_error = False, why
        self._failures += 1
        return why

    def failed_in_relay(self, err: int) -> StoreError:
        """A relay thread's append failed with errno err: record why, as append does."""
        with self._lock:
            return StoreError(self._failed(OSError(err, os.strerror(err))))

    def append_json(self, kind: Kind, obj: dict, ts_ns: int | None = None) -> int:
        return self.append(kind, orjson.dumps(obj), ts_ns)

    def append_data(self, session_id: int, direction: Direction, data: bytes,
                    ts_ns: int | None = None) -> int:
        return self.append(Kind.DATA, data, ts_ns, data_payload_head(session_id, direction))

    # -- failing closed and coming back ------------------------------------------------

    def defer_json(self, kind: Kind, obj: dict) -> int | None:
        """Append now if possible, else keep it in memory until the store works.

        For alerts (the store's own, a bypass seen while the disk is full):
        they must not be lost while it fails, nor stop whoever raised them.
        Returns the seq, or None when deferred.
        """
        payload = orjson.dumps(obj)
        try:
            return self.append(kind, payload)
        except StoreError:
            with self._lock:
                if len(self._deferred) >= self._max_deferred:
                    self._deferred.popleft()
                    self._deferred_dropped += 1
                self._deferred.append((kind, payload))
            return None

    def probe(self) -> bool:
        """Try to write what was deferred; True when the store appends again."""
        with self._lock:
            try:
                self._guard(self._recover_locked)
            except StoreError:
                return False
            return True

    def _recover_locked(self) -> None:
        if self.healthy and not self._deferred:
            return
        while self._deferred:
            kind, payload = self._deferred[0]
            self._append_locked(kind, payload, time.time_ns())
            self._deferred.popleft()
        if not self.healthy:
            self._append_locked(Kind.EVENT, orjson.dumps({
                "event": "store_recovered", "failed_at_ns": self._failed_at_ns,
                "failed_appends": self._failures, "error": self.last_error,
                "deferred_dropped": self._deferred_dropped}), time.time_ns())
            self.healthy, self._failures, self._deferred_dropped = True, 0, 0

    # -- sealing -------------------------------------------------------------------------

    def _seal_if_due(self) -> None:
        """Seal by bytes or time; a failed seal marks the store unhealthy, not the caller's record."""
        if not self._seal_due(time.monotonic_ns()):
            return
        try:
            self._guard(self._seal_locked)
        except StoreError:
            pass

    def _seal_due(self, now: int) -> bool:
        if self.seal_key is None:
            return False
        # Per append: the interval (nearly always not yet) is asked first.
        if (now - self._seal_at_ns < self.seal_interval_ns
                and self._chain.seal_bytes < self.seal_interval_bytes):
            return False
        return self._unsealed()

    def _unsealed(self) -> bool:
        """Records appended since the newest seal."""
        return not (self._last_seal and self._last_seal["seq"] == self._next_seq - 1)

    def _seal_locked(self) -> None:
        key = self.seal_key
        ts = max(time.time_ns(), self._last_seal["ts"] if self._last_seal else 0)
        upto, head = self._next_seq - 1, self._head
        payload = sealing.seal_payload(key.mac_key(), key.key_id, self.store_id, key.epoch,
                                       upto, head, ts)
        seq = self._append_locked(Kind.SEAL, payload, ts)
        self._last_seal = {"epoch": key.epoch, "seq": seq, "ts": ts, "key_id": key.key_id.hex()}
        key.step()  # this seal's key leaves memory now; the file's, in _ratchet
        self._pending_ratchet = seq
        self._seal_bytes, self._seal_at_ns = 0, time.monotonic_ns()
        self.seals += 1

    def _ratchet(self, force: bool = False) -> None:
        """Erase the keys of the seals made so far from the key file, once
        those seals are on disk; unless forced, at most once per seal interval.

        The order matters: if the key went first and the seal were lost in a
        crash, the next seal would skip an epoch and verify would fail. The
        interval is the price of that order: each erase needs an fsync of the
        store, and seals by bytes come hundreds of times a second under bulk
        traffic (the file then lags memory by at most one interval).
        """
        with self._seal_lock:
            now = time.monotonic_ns()
            if self._pending_ratchet is None or (
                    not force and self._key_persisted_ns is not None
                    and now - self._key_persisted_ns < self.seal_interval_ns):
                return
            with self._lock:
                seq, state = self._pending_ratchet, self.seal_key.checkpoint()
            if self._synced_seq < seq:
                self.sync()
            try:
                self.seal_key.persist(state)
            except OSError as e:
                raise StoreError(f"cannot advance the sealing key: {e.strerror}") from e
            self._key_persisted_ns = now
            with self._lock:
                if self._pending_ratchet == seq:
                    self._pending_ratchet = None  # else a newer seal's key waits

    def seal_now(self) -> int | None:
        """Seal the chain head now and erase its key; returns the seal's seq."""
        if self.seal_key is None:
            return None
        with self._lock:
            if self._unsealed():
                self._guard(self._seal_locked)
            seq = self._last_seal["seq"]
        self._ratchet(force=True)
        return seq

    # -- upkeep ------------------------------------------------------------------------

    def maintain(self) -> None:
        """Periodic work: retry a failed store, rotate by age, seal by time, erase keys."""
        with self._lock:
            if not self.healthy or self._deferred:
                try:
                    self._guard(self._recover_locked)
                except StoreError:
                    return
            self._chain.wake_sent = 0
            if self._rotation_due(time.time_ns()):
                self._guard(self._rotate)
            self._seal_if_due()
        self._ratchet()

    def upkeep_in_s(self, interval_s: float) -> float:
        """Seconds until maintain() has timed work: at once and then every
        interval_s while the store fails or holds deferred records; else the
        next rotation by age, seal by time or key erase, and at most the seal
        interval (a relay thread's records after a quiet spell are sealed
        within it). Segments filled and seals due by bytes wake it early."""
        if not self.healthy or self._deferred:
            return interval_s
        mono, waits = time.monotonic_ns(), [UPKEEP_IDLE_S]
        if self.segment_max_age_ns is not None and self._segment_has_records():
            waits.append((self._seg_started_ns + self.segment_max_age_ns - time.time_ns()) / 1e9)
        if self.seal_key is not None:
            waits.append(self.seal_interval_ns / 1e9)
            if self._unsealed():
                waits.append((self._seal_at_ns + self.seal_interval_ns - mono) / 1e9)
            if self._pending_ratchet is not None:
                persisted = self._key_persisted_ns or 0
                waits.append((persisted + self.seal_interval_ns - mono) / 1e9)
        return max(min(waits), interval_s)

    def start_maintenance(self, interval_s: float) -> None:
        def loop() -> None:
            # Woken early by the relay threads when a segment is full or a seal due.
            while True:
                if select.select([self._wake], [], [], self.upkeep_in_s(interval_s))[0]:
                    os.eventfd_read(self._wake)
                if self._stop.is_set():
                    return
                try:
                    self.maintain()
                except StoreError:
                    pass  # healthy is off and last_error says why; the caller watches those
                self._chain.warm()   # a new window asks for the next one (chain.c)
        self._thread = threading.Thread(target=loop, name="tollgate-store", daemon=True)
        self._thread.start()

    # -- durability ------------------------------------------------------------

    def sync(self) -> int:
        """fsync everything appended so far; returns the last durable seq."""
        self._settle()
        with self._lock:
            upto = self._next_seq - 1
            # A dup, so a rotation closing the segment meanwhile cannot break the fsync
            # (rotation fsyncs the old segment itself before closing it).
            fd = self._guard(os.dup, self._fd)
        try:
            self._guard(os.fsync, fd)
        finally:
            os.close(fd)
        self.fsyncs += 1
        self._synced_seq = max(self._synced_seq, upto)
        return self._synced_seq

    @property
    def chain(self) -> Chain:
        """The append point relay threads share (agent/native)."""
        return self._chain

    @property
    def synced_seq(self) -> int:
        return self._synced_seq

    @property
    def head(self) -> tuple[int, bytes]:
        return self._next_seq - 1, self._head

    def statistics(self) -> dict:
        key = self.seal_key
        return {"records": self.appended_records, "bytes": self.appended_bytes,
                "next_seq": self._next_seq, "segment": self._seg_path.name,
                "synced_seq": self._synced_seq, "durability": self.durability,
                "fsyncs": self.fsyncs, "healthy": self.healthy, "last_error": self.last_error,
                "deferred": len(self._deferred), "store_id": self.store_id,
                "immutable": "supported" if self.immutable_error is None
                             else f"unsupported: {self.immutable_error}",
                "immutable_segments": self._immutable_set,
                "sealing": "on" if key else "off: no key",
                "seal_epoch": key.epoch if key else None, "seals": self.seals,
                "key_file_epoch": key.file_epoch if key else None,
                "sealed_upto": self._last_seal["seq"] - 1 if self._last_seal else -1,
                "recovered": self.recovered}

    def close(self) -> None:
        self._stop.set()
        if self._wake >= 0:
            os.eventfd_write(self._wake, 1)
        if self._thread is not None:
            self._thread.join()
        self._settle()
        if self._fd < 0:
            return
        try:
            self.seal_now()
        except StoreError:
            pass  # closing anyway; the next open seals what is unsealed
        with self._lock:
            try:
                self._chain.trim()
                os.fsync(self._fd)
            except OSError:
                pass  # nothing more to do here: appends already reported the failure
            os.close(self._fd)
            self._fd = -1
        self._chain.wake_fd = -1
        os.close(self._wake)
        self._wake = -1
        if self.seal_key:
            self.seal_key.close()
