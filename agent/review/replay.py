"""The views of one session `tollgate replay` offers, over one record source.

A view is a function from the session's records to lines; the record source
is the stored session, or for ``--follow`` the stored part and then what the
agent appends until the session closes. So every view works live.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Iterable, Iterator

from agent.review.follow import follow_session
from agent.review.hexdump import render_hex
from agent.review.render import item_json, render_items
from agent.review.sessions import session_records
from agent.review.text import json_text, printable, stamp
from agent.review.view import Detected, Opened, view_items
from agent.store import Direction, Kind, Record

__all__ = ["open_session", "render_text", "render_decoded", "render_hex", "json_document", "json_lines",
           "raw_bytes", "VIEWS", "printable", "stamp"]


def open_session(store_dir: str, session_id: int, follow: bool = False) -> Iterator[Record]:
    """The session's records (live with ``follow``); LookupError if there is no such session."""
    source = follow_session(store_dir, session_id) if follow else session_records(store_dir, session_id)
    first = next(source, None)
    if first is None or first.kind != Kind.SESSION_OPEN:
        raise LookupError(f"no session {session_id} in {store_dir}")
    return itertools.chain([first], source)


def render_text(records: Iterable[Record]) -> Iterator[str]:
    """Each DATA record as text (control characters escaped), with its time."""
    return render_items(view_items(records, decode=False))


def render_decoded(records: Iterable[Record]) -> Iterator[str]:
    """The conversation as the decoders understand it, text where they cannot."""
    return render_items(view_items(records))


def json_lines(records: Iterable[Record]) -> Iterator[str]:
    """One JSON object a view item (for --follow: usable as it arrives)."""
    for item in view_items(records):
        yield json_text(item_json(item), indent=False)


def json_document(records: Iterable[Record]) -> dict:
    """The session and all its decoded items, as one document."""
    items = list(view_items(records))
    opened = next((i for i in items if isinstance(i, Opened)), None)
    protocol = next((i.protocol for i in items if isinstance(i, Detected)), None)
    return {"session": opened.session if opened else None, "protocol": protocol,
            "events": [item_json(i) for i in items]}


VIEWS: dict[str, Callable[[Iterable[Record]], Iterator[str]]] = {
    "decoded": render_decoded, "text": render_text, "hex": render_hex, "json": json_lines,
}


def raw_bytes(records: Iterable[Record], direction: Direction) -> Iterator[bytes]:
    for r in records:
        if r.kind == Kind.DATA:
            _, d, data = r.data()
            if d == direction:
                yield data
