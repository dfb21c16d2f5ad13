"""Retention: delete the oldest segments once shipped and past retention.

Only a prefix of the store goes (never a segment in the middle, never the
active one), so what remains still chains from its first SEGMENT_START. The
deletion is evidence too: a store_gc EVENT naming each deleted segment's
last seq and head is appended BEFORE anything is deleted (a crash between
leaves a named but present segment, which verify accepts), and verify
accepts a store that starts after seq 0 only when such a record names the
segment just before its first one.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import orjson

from agent.store.format import HEADER, HEADER_SIZE, CRC, Kind
from agent.store.immutable import set_immutable
from agent.store.reader import segment_paths
from agent.store.writer import StoreError, StoreWriter, fsync_dir


def _previous_summary(path: Path) -> dict | None:
    """The summary of the segment before, as the SEGMENT_START of `path` records it."""
    with open(path, "rb") as f:
        head = f.read(HEADER_SIZE)
        if len(head) < HEADER_SIZE:
            return None
        length = HEADER.unpack(head)[3]
        payload = f.read(length + CRC.size)[:length]
    try:
        return orjson.loads(payload).get("previous")
    except (orjson.JSONDecodeError, AttributeError):
        return None


def plan_gc(store_dir: str | os.PathLike, retention_days: float,
            shipped_upto_seq: int | None = None, *, allow_unshipped: bool = False,
            now: float | None = None) -> list[dict]:
    """The segments gc would delete: a prefix, old enough and shipped, never the last."""
    if shipped_upto_seq is None and not allow_unshipped:
        return []  # no shipping cursor: deleting would destroy the only copy
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    paths = segment_paths(store_dir)
    plan = []
    for path, following in zip(paths, paths[1:]):
        summary = _previous_summary(following)
        if (summary is None or summary.get("segment") != path.name
                or path.stat().st_mtime >= cutoff):
            break
        if shipped_upto_seq is not None and summary["last_seq"] > shipped_upto_seq:
            break
        plan.append(summary)
    return plan


def gc_event(deleted: list[dict]) -> dict:
    """The EVENT payload that records a gc; verify looks for exactly this shape."""
    return {"event": "store_gc", "deleted": deleted}


def delete_segments(store_dir: str | os.PathLike, deleted: list[dict]) -> None:
    d = Path(store_dir)
    for item in deleted:
        path = d / item["segment"]
        set_immutable(path, False)
        path.unlink(missing_ok=True)
    fsync_dir(d)


def gc(store_dir: str | os.PathLike, retention_days: float,
       shipped_upto_seq: int | None = None, *, allow_unshipped: bool = False,
       writer: StoreWriter | None = None, now: float | None = None) -> list[dict]:
    """Delete old shipped segments; returns what was deleted.

    With writer, the store_gc EVENT is appended and synced first. Without
    one (the agent owns the writer elsewhere), the caller must append
    gc_event(result) at once, or verify will report the gap.
    """
    plan = plan_gc(store_dir, retention_days, shipped_upto_seq,
                   allow_unshipped=allow_unshipped, now=now)
    if not plan:
        return []
    if writer is not None:
        writer.append_json(Kind.EVENT, gc_event(plan))
        writer.sync()
    try:
        delete_segments(store_dir, plan)
    except OSError as e:
        raise StoreError(f"gc could not delete a segment: {e.strerror}") from e
    return plan
