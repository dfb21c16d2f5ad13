"""The shipped position of one lane, persisted atomically.

write tmp, fsync, rename, fsync dir: after a crash the file holds either the
old or the new position, never a torn one. The position only moves after the
server confirmed everything before it, so restarting from it resends at most
one batch (whose insertIds fold into the copies already written).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import orjson

log = logging.getLogger("tollgate.ship")


class Cursor:
    def __init__(self, path: str | os.PathLike, store_id: str):
        self.path = Path(path)
        self.store_id = store_id
        self.next_seq = self._load()

    def _load(self) -> int:
        try:
            doc = orjson.loads(self.path.read_bytes())
        except FileNotFoundError:
            return 0
        if doc.get("store_id") != self.store_id:
            # Another store: its positions mean nothing here. insertIds carry
            # the store id, so starting over cannot collide with old entries.
            log.warning("cursor %s is for store %s, not %s: starting at 0",
                        self.path, doc.get("store_id"), self.store_id)
            return 0
        return int(doc["next_seq"])

    def advance(self, next_seq: int) -> None:
        """Persist next_seq (the first seq not yet shipped)."""
        if next_seq <= self.next_seq:
            return
        write_atomic(self.path, orjson.dumps(
            {"store_id": self.store_id, "next_seq": next_seq}))
        self.next_seq = next_seq


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dfd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
