"""Records of a live session as the agent appends them (``replay --follow``).

``iter_records`` re-reads (and re-hashes) a whole segment, up to 64 MiB, from
its start: too much to repeat twice a second on a busy bastion. So after one
ordinary read up to the end, this keeps its place with the store's Tailer and
reads only what was appended since. The chain is not checked here:
``tollgate verify`` does that.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Iterator

from agent.review.sessions import concerns
from agent.store import Kind, Record, iter_records
from agent.store.tailer import Tailer

__all__ = ["follow_session"]


def follow_session(store_dir: str, session_id: int, poll_s: float = 0.5,
                   stop: Callable[[], bool] = lambda: False) -> Iterator[Record]:
    """The session's records so far, then each new one, until its close (or ``stop()``)."""
    last = None
    for r in iter_records(store_dir, strict=False, start_seq=session_id):
        last = r
        if concerns(r, session_id):
            yield r
            if r.kind == Kind.SESSION_CLOSE:
                return
    if last is None:
        return
    tail = Tailer.after(store_dir, last)
    while not stop():
        records = tail.poll()
        for r in records:
            if concerns(r, session_id):
                yield r
                if r.kind == Kind.SESSION_CLOSE:
                    return
        if not records:
            time.sleep(poll_s)
