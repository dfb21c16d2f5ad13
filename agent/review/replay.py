"""Rendering a session for a reader: both directions in order, with times."""

from __future__ import annotations

import datetime as dt
from typing import Iterable, Iterator

from agent.store import Direction, Kind, Record

ARROW = {Direction.CLIENT: "subject -> dst", Direction.SERVER: "dst -> subject"}


def stamp(ts_ns: int) -> str:
    return dt.datetime.fromtimestamp(ts_ns / 1e9, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def printable(data: bytes, limit: int | None = None) -> str:
    """Text as text; other bytes escaped, so nothing the subject sent can
    drive the reviewer's terminal."""
    chunk = data if limit is None else data[:limit]
    out = chunk.decode("utf-8", "backslashreplace")
    out = "".join(c if c.isprintable() or c in "\n\t" else repr(c)[1:-1] for c in out)
    if limit is not None and len(data) > limit:
        out += f"... ({len(data) - limit} more bytes)"
    return out


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
