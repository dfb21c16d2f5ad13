"""Rendering a session for a reader: both directions in order, with times."""

from __future__ import annotations

from typing import Iterable, Iterator

from agent.review.text import printable, stamp
from agent.store import Direction, Kind, Record

__all__ = ["render_text", "raw_bytes", "printable", "stamp", "ARROW"]

ARROW = {Direction.CLIENT: "subject -> dst", Direction.SERVER: "dst -> subject"}


def render_text(records: Iterable[Record]) -> Iterator[str]:
    for r in records:
        if r.kind == Kind.SESSION_OPEN:
            j = r.json()
            yield (f"{stamp(r.ts_ns)} open  session {r.seq}: {j['client'][0]}:{j['client'][1]}"
                   f" -> {j['original_dst'][0]}:{j['original_dst'][1]}")
        elif r.kind == Kind.SESSION_INFO:
            for p in r.json().get("chain", []):
                yield f"{'':24} process pid {p['pid']} uid {p['uid']}: {' '.join(p.get('argv') or [])}"
        elif r.kind == Kind.DATA:
            _, d, data = r.data()
            yield f"{stamp(r.ts_ns)} {ARROW[d]} {len(data)} bytes"
            yield _indent(printable(data, 4096))
        elif r.kind == Kind.SESSION_CLOSE:
            j = r.json()
            yield (f"{stamp(r.ts_ns)} close ({j['reason']}): {j['client_bytes']} bytes sent, "
                   f"{j['server_bytes']} bytes received")


def _indent(text: str) -> str:
    return "\n".join("    " + line for line in text.splitlines() or [""])


def raw_bytes(records: Iterable[Record], direction: Direction) -> Iterator[bytes]:
    for r in records:
        if r.kind == Kind.DATA:
            _, d, data = r.data()
            if d == direction:
                yield data
