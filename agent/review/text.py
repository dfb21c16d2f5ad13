"""Making recorded text safe to show.

Everything a review view prints came from the subject or its servers: a
query, a header, a banner, a file name. A terminal obeys escape sequences
and carriage returns in what it prints, and a subject could use them to
hide or forge lines of the reviewer's view. So every string passes through
``clean`` before it is shown: printable characters stay, the rest become
Python-style escapes (``\\x1b``, ``\\r``, ``\\u202e``).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import orjson


def clean(text: str, newlines: bool = True) -> str:
    """``text`` with every non-printable character escaped; ``\\n`` and
    ``\\t`` kept when ``newlines`` (for multi-line bodies)."""
    keep = "\n\t" if newlines else ""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() or c in keep else _escape(c) for c in text)


def _escape(c: str) -> str:
    code = ord(c)
    if code < 0x100:
        return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(c, f"\\x{code:02x}")
    return f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(data: bytes, limit: int | None = None) -> str:
    """Bytes as text: UTF-8 where it is, other bytes escaped, control
    characters escaped; longer than ``limit`` is cut with a note."""
    chunk = data if limit is None else data[:limit]
    out = clean(chunk.decode("utf-8", "backslashreplace"))
    if limit is not None and len(data) > limit:
        out += f"... ({len(data) - limit} more bytes)"
    return out


def stamp(ts_ns: int) -> str:
    """UTC time to the millisecond, as every review view prints it."""
    return dt.datetime.fromtimestamp(ts_ns / 1e9, dt.timezone.utc).strftime(
        "%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def address(addr: tuple[str, int] | list) -> str:
    """``ip:port``, with brackets around an IPv6 address."""
    host, port = addr[0], addr[1]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


def indent(text: str, prefix: str = "    ") -> list[str]:
    """Lines of ``text``, each prefixed; split on ``\\n`` only, so other
    line-breaking characters stay visible as escapes."""
    return [prefix + line for line in text.split("\n")]


def _json_escape(c: str) -> str:
    code = ord(c)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # JSON spells these as a UTF-16 surrogate pair
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_text(obj: Any, indent: bool = True) -> str:
    """JSON for a terminal: orjson escapes only C0 controls, so DEL, C1
    controls, bidi overrides and the like are escaped here (outside strings
    JSON has only printable characters and newlines, so this stays valid)."""
    out = orjson.dumps(obj, option=orjson.OPT_INDENT_2 if indent else 0, default=str).decode()
    if out.isprintable():
        return out
    return "".join(c if c.isprintable() or c == "\n" else _json_escape(c) for c in out)
