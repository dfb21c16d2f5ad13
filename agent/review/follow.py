"""Records of a live session as the agent appends them (``replay --follow``).

The store has no tail API, and ``iter_records`` re-reads (and re-hashes) a
whole segment, up to 64 MiB, from its start: too much to repeat twice a
second on a busy bastion. So after one ordinary read up to the end, this
keeps its place (segment file, byte offset) and reads only what was appended
since, frame by frame; a partial frame at the end is waited for, and a newer
segment is moved to once the current one has nothing more. The chain is not
checked here: ``tollgate verify`` does that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Iterator

from agent.review.sessions import session_of
from agent.store import Kind, Record, iter_records
from agent.store.format import CRC, HEADER_SIZE
# the one frame parser (length, crc, kind); private to the store, used as is
from agent.store.reader import _read_frame, segment_paths

__all__ = ["follow_session", "Tail"]


class Tail:
    """New whole records after a known position in the store."""

    def __init__(self, store_dir: str, segment: str, offset: int) -> None:
        self.dir = Path(store_dir)
        self.segment, self.offset = segment, offset

    @classmethod
    def after(cls, store_dir: str, r: Record) -> Tail:
        return cls(store_dir, r.segment, r.offset + HEADER_SIZE + len(r.payload) + CRC.size)

    def poll(self) -> list[Record]:
        records = self._read()
        if records:
            return records
        later = [p for p in segment_paths(self.dir) if p.name > self.segment]
        if not later:
            return []
        # The writer starts a new segment only once it has finished this one:
        # what this segment got before the new one appeared is read now, and
        # nothing comes after it.
        records = self._read()
        if not records:
            self.segment, self.offset = later[0].name, 0
            records = self._read()
        return records

    def _read(self) -> list[Record]:
        try:
            with open(self.dir / self.segment, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:  # removed by gc: the next poll moves on
            return []
        view, at, out = memoryview(data), 0, []
        while at < len(data):
            rec, _why = _read_frame(view, at, self.segment)
            if rec is None:
                break  # a frame still being written
            out.append(rec)
            at += HEADER_SIZE + len(rec.payload) + CRC.size
        self.offset += at
        return out


def follow_session(store_dir: str, session_id: int, poll_s: float = 0.5,
                   stop: Callable[[], bool] = lambda: False) -> Iterator[Record]:
    """The session's records so far, then each new one, until its close (or ``stop()``)."""
    last = None
    for r in iter_records(store_dir, strict=False, start_seq=session_id):
        last = r
        if session_of(r) == session_id:
            yield r
            if r.kind == Kind.SESSION_CLOSE:
                return
    if last is None:
        return
    tail = Tail.after(store_dir, last)
    while not stop():
        records = tail.poll()
        for r in records:
            if session_of(r) == session_id:
                yield r
                if r.kind == Kind.SESSION_CLOSE:
                    return
        if not records:
            time.sleep(poll_s)
