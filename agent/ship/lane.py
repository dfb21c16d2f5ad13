"""One lane: a cursor, the record kinds it ships, and its batching.

The shipper runs two lanes over the same store: seals/alerts (small, on
their own log names) and everything else. Each has its own cursor and
thread, so a payload backlog never delays a seal or an alert.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from agent.ship.cursor import Cursor
from agent.ship.entries import Target, build_entries, session_of
from agent.ship.sender import Sender
from agent.ship.sessions import Subjects
from agent.store.format import Record
from agent.store.reader import iter_records, written_end

# Framing per entry inside WriteLogEntriesRequest (tag + length varint).
ENTRY_OVERHEAD = 8


@dataclass(frozen=True, slots=True)
class LaneStatistics:
    name: str
    next_seq: int           # first seq not yet shipped
    seen_seq: int           # last seq read from the store
    backlog_bytes: int      # store bytes from the cursor on
    oldest_ts_ns: int | None  # time of the oldest record not yet shipped


class Lane:
    def __init__(self, name: str, store_dir: str | os.PathLike, cursor: Cursor,
                 wants: Callable[[Record], bool], target: Target, sender: Sender,
                 subjects: Subjects, max_entries: int, max_bytes: int):
        self.name = name
        self._dir = Path(store_dir)
        self.cursor = cursor
        self._wants, self._target, self._sender = wants, target, sender
        self._subjects = subjects
        self._max_entries, self._max_bytes = max_entries, max_bytes
        self._lock = threading.Lock()  # one run at a time (run_once vs run_forever)
        self._seen_seq = cursor.next_seq - 1
        self._oldest: tuple[int, str, int] | None = None  # ts_ns, segment, offset
        # Re-reading the active segment every poll is the cost of an idle
        # shipper; skip it while the store has not grown since the last run.
        self._shipped_mark: tuple[str, int] | None = None
        self._walked: tuple[str, int] = ("", 0)  # where the last segment's frames ended

    def run_once(self) -> int:
        """Ship every record present now; returns the number of records shipped."""
        with self._lock:
            mark = self._store_mark()
            if mark == self._shipped_mark:
                return 0  # nothing appended since everything was shipped
            shipped = 0
            batch, size, records, upto = [], 0, 0, self.cursor.next_seq
            for entry, done_seq, record in self._entries():
                if entry is None:
                    upto = done_seq
                    continue
                entry_size = entry.ByteSize() + ENTRY_OVERHEAD
                if batch and (len(batch) >= self._max_entries
                              or size + entry_size > self._max_bytes):
                    shipped += self._flush(batch, records, upto)
                    batch, size, records = [], 0, 0
                if not batch:
                    # Records arrive in time order: a batch's first is the oldest.
                    self._oldest = (record.ts_ns, record.segment, record.offset)
                batch.append(entry)
                size += entry_size
                if done_seq is not None:
                    upto, records = done_seq, records + 1
            shipped += self._flush(batch, records, upto)
            self._oldest = None
            self._shipped_mark = mark
            return shipped

    def _store_mark(self) -> tuple[str, int] | None:
        """(last segment, where its frames end): unchanged means nothing new
        to read. Walks only the headers appended since the last look."""
        paths = sorted(self._dir.glob("*.seg"))
        if not paths:
            return None
        name, start = self._walked
        try:
            end = written_end(paths[-1], start if name == paths[-1].name else 0)
        except FileNotFoundError:  # removed by gc meanwhile: look again next time
            return None
        self._walked = (paths[-1].name, end)
        return self._walked

    def _flush(self, batch: list, records: int, upto: int) -> int:
        if batch:
            self._sender.send(batch)
        self.cursor.advance(upto)
        return records

    def _entries(self) -> Iterator[tuple[object | None, int | None, Record]]:
        """(part, None) for all but a record's last part, (last part, seq + 1)
        for that, (None, seq + 1) for a record this lane skips."""
        for record in iter_records(self._dir, start_seq=self.cursor.next_seq):
            self._seen_seq = record.seq
            self._subjects.note(record)
            if not self._wants(record):
                yield None, record.seq + 1, record
                continue
            subject = self._subjects.subject_of(session_of(record))
            parts = build_entries(record, self._target, subject)
            for part in parts[:-1]:
                yield part, None, record
            yield parts[-1], record.seq + 1, record

    def statistics(self, head_seq: int | None = None) -> LaneStatistics:
        oldest = self._oldest
        return LaneStatistics(self.name, self.cursor.next_seq,
                              max(self._seen_seq, head_seq if head_seq is not None else -1),
                              self._backlog_bytes(oldest), oldest[0] if oldest else None)

    def _backlog_bytes(self, oldest: tuple[int, str, int] | None) -> int:
        if oldest is None:
            return 0
        total = 0
        for path in sorted(self._dir.glob("*.seg")):
            if path.name >= oldest[1]:
                # the last segment's size counts its preallocated zeros
                size = (written_end(path, self._walked[1]) if path.name == self._walked[0]
                        else path.stat().st_size)
                total += size - (oldest[2] if path.name == oldest[1] else 0)
        return total
