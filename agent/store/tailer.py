"""New whole records after a known place in the store, for readers that
follow a live store (``replay --follow``) without re-reading segments.

It keeps its place (segment file, byte offset) and reads only what was
appended since, frame by frame; a partial frame at the end is waited for,
and a newer segment is moved to once the current one has nothing more.
Frames are checked (length, crc, kind); the chain is `verify`'s job.
"""

from __future__ import annotations

from pathlib import Path

from agent.store.format import CRC, HEADER_SIZE, Record
from agent.store.reader import read_frame, segment_paths

__all__ = ["Tailer"]


class Tailer:
    """New whole records after a known position in the store."""

    def __init__(self, store_dir: str, segment: str, offset: int) -> None:
        self.dir = Path(store_dir)
        self.segment, self.offset = segment, offset

    @classmethod
    def after(cls, store_dir: str, r: Record) -> "Tailer":
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
            rec, _why = read_frame(view, at, self.segment)
            if rec is None:
                break  # a frame still being written
            out.append(rec)
            at += HEADER_SIZE + len(rec.payload) + CRC.size
        self.offset += at
        return out
