"""One pass of the store for many views.

A view that reads the whole store (sessions, alerts, runs, digests) is a
fold: it takes the records one at a time and is read when they end. The
report needs four of them, and each pass re-reads and re-checks every frame
(crc, chain): `fold` feeds them all from one."""

from __future__ import annotations

import os
from typing import Any, Protocol

from agent.store import Record, iter_records

__all__ = ["Fold", "fold"]


class Fold(Protocol):
    def add(self, r: Record) -> None: ...
    def result(self) -> Any: ...


def fold(store_dir: str | os.PathLike, *folds: Fold) -> list[Any]:
    """Every record of the store to each fold, in order (live: a torn tail
    is allowed); then each fold's result, in the order given."""
    adds = [f.add for f in folds]
    for r in iter_records(store_dir, strict=False):
        for add in adds:
            add(r)
    return [f.result() for f in folds]
