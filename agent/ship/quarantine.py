"""Entries the server refused for good, kept on the host.

One file per refused entry, named by its insertId, holding the entry, the
error and the time its tombstone carries. Keeping that time makes the
tombstone idempotent too: a resend after a crash reuses it.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import orjson
from google.protobuf import json_format

from agent.ship.cursor import write_atomic


class Quarantine:
    def __init__(self, directory: str | os.PathLike, clock_ns: Callable[[], int]):
        self.dir = Path(directory)
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._clock_ns = clock_ns

    def keep(self, entry, error: str) -> int:
        """Store entry (once); returns the tombstone time for it."""
        path = self.dir / f"{entry.insert_id}.json"
        try:
            return int(orjson.loads(path.read_bytes())["tombstone_ts_ns"])
        except FileNotFoundError:
            pass
        ts_ns = self._clock_ns()
        write_atomic(path, orjson.dumps({
            "insert_id": entry.insert_id, "error": error, "tombstone_ts_ns": ts_ns,
            "entry": json_format.MessageToDict(entry)}))
        return ts_ns

    def count(self) -> int:
        return sum(1 for _ in self.dir.glob("*.json"))
