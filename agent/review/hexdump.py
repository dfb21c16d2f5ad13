"""The hex view: every DATA record of a session, both directions, as a
classic offset / hex / ASCII dump (only printable ASCII in the last column,
so nothing recorded reaches the terminal as a control sequence)."""

from __future__ import annotations

from typing import Iterable, Iterator

from agent.review.render import ARROWS, TextRenderer
from agent.review.text import stamp
from agent.review.view import Raw, view_items
from agent.store import Record

__all__ = ["hexdump", "render_hex"]

WIDTH = 16


def hexdump(data: bytes, offset: int = 0) -> Iterator[str]:
    """`00000010  47 45 54 20 ...  |GET ...|`; offsets count from ``offset``."""
    for at in range(0, len(data), WIDTH):
        row = data[at:at + WIDTH]
        hexes = " ".join(f"{b:02x}" for b in row)
        text = "".join(chr(b) if 0x20 <= b < 0x7F else "." for b in row)
        yield f"{offset + at:08x}  {hexes:<{WIDTH * 3 - 1}}  |{text}|"


def render_hex(records: Iterable[Record]) -> Iterator[str]:
    """The session's header lines, then each record's bytes with its time
    and its offset in its direction's stream."""
    header = TextRenderer()
    for item in view_items(records, decode=False):
        if not isinstance(item, Raw):
            yield from header.lines(item)
            continue
        yield (f"{stamp(item.ts_ns)} {ARROWS[item.direction.value]} {len(item.data)} bytes "
               f"at {item.direction.name.lower()} offset {item.offset}")
        yield from hexdump(item.data, item.offset)
