"""The plain views of a session: its bytes as text with times, or exactly."""

from __future__ import annotations

from typing import Iterable, Iterator

from agent.review.render import render_items
from agent.review.text import printable, stamp
from agent.review.view import view_items
from agent.store import Direction, Kind, Record

__all__ = ["render_text", "raw_bytes", "printable", "stamp"]


def render_text(records: Iterable[Record]) -> Iterator[str]:
    """Each DATA record as text (control characters escaped), with its time."""
    return render_items(view_items(records, decode=False))


def raw_bytes(records: Iterable[Record], direction: Direction) -> Iterator[bytes]:
    for r in records:
        if r.kind == Kind.DATA:
            _, d, data = r.data()
            if d == direction:
                yield data
