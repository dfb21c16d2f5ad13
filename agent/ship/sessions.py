"""Session id -> subject, for the 'subject' label of a session's records.

The shipper sees a SESSION_OPEN before its DATA, so the cache is normally
filled in passing. After a restart past the open, the open record is read
back by its seq (a session's id is its SESSION_OPEN seq).
"""

from __future__ import annotations

import os
from collections import OrderedDict

from agent.store.format import Kind, Record
from agent.store.reader import iter_records


class Subjects:
    def __init__(self, store_dir: str | os.PathLike, size: int = 4096):
        self._dir = store_dir
        self._size = size
        self._cache: OrderedDict[int, str | None] = OrderedDict()

    def note(self, record: Record) -> None:
        if record.kind is Kind.SESSION_OPEN:
            self._put(record.seq, _subject(record))

    def subject_of(self, session_id: int | None) -> str | None:
        if session_id is None:
            return None
        if session_id in self._cache:
            self._cache.move_to_end(session_id)
            return self._cache[session_id]
        subject = None
        for record in iter_records(self._dir, strict=False, start_seq=session_id):
            if record.seq == session_id and record.kind is Kind.SESSION_OPEN:
                subject = _subject(record)
            break
        self._put(session_id, subject)
        return subject

    def _put(self, session_id: int, subject: str | None) -> None:
        self._cache[session_id] = subject
        self._cache.move_to_end(session_id)
        while len(self._cache) > self._size:
            self._cache.popitem(last=False)


def _subject(record: Record) -> str | None:
    try:
        doc = record.json()
    except ValueError:
        return None
    subject = doc.get("subject") if isinstance(doc, dict) else None
    return None if subject is None else str(subject)
