"""Redis serialization protocol: RESP2 and RESP3 values, and inline commands.

The client sends arrays of bulk strings (or, from telnet-like clients, an
inline line split on spaces); the server answers one value per command.
A value is parsed whole from the buffer; until it is all there the parse
raises ``Incomplete`` and starts again with more bytes.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass
from typing import Union

from .base import Decoder, Direction, Error, Event, Malformed, Reader, text

__all__ = ["RedisDecoder", "RedisCommand", "RedisReply"]

# str for strings, int, float-as-text ("3.14"), bool, None, tuple for arrays,
# sets and pushes, tuple of (key, value) pairs for maps.
Value = Union[str, int, bool, None, tuple["Value", ...]]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisCommand(Event):
    args: tuple[str, ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class RedisReply(Event):
    value: Value


_MAX_DEPTH = 32
_MAX_LENGTH = 512 * 1024 * 1024  # Redis's own proto-max-bulk-len default
_AGGREGATES = {ord("*"), ord("~"), ord(">"), ord("%"), ord("|")}
_SIMPLE = {ord("+"), ord("-"), ord(":"), ord("_"), ord("#"), ord(","), ord("(")}
_BULK = {ord("$"), ord("!"), ord("=")}
TYPE_BYTES = _AGGREGATES | _SIMPLE | _BULK


class _ErrorValue(str):
    """An error nested in an aggregate (e.g. inside an EXEC reply)."""


def _line(r: Reader) -> bytes:
    return r.until(b"\r\n")


def _length(r: Reader) -> int:
    raw = _line(r)
    if not raw.lstrip(b"-").isdigit():
        raise Malformed(f"bad length {raw[:20]!r}")
    value = int(raw)
    if value > _MAX_LENGTH:
        raise Malformed(f"length {value} too large")
    return value


def parse_value(r: Reader, depth: int = 0) -> Value:
    """One RESP value at the reader's position."""
    if depth > _MAX_DEPTH:
        raise Malformed("values nested too deep")
    kind = r.u8()
    if kind in _SIMPLE:
        return _simple(kind, text(_line(r)))
    if kind in _BULK:
        size = _length(r)
        if size < 0:
            return None
        data = r.take(size)
        if r.take(2) != b"\r\n":
            raise Malformed("bulk string without CRLF")
        value = text(data[4:] if kind == ord("=") else data)  # verbatim strings start with "txt:"
        return _ErrorValue(value) if kind == ord("!") else value
    if kind in _AGGREGATES:
        return _aggregate(kind, r, depth)
    raise Malformed(f"unknown RESP type byte {kind:#x}")


def _simple(kind: int, line: str) -> Value:
    if kind == ord(":") or kind == ord("("):
        return int(line)
    if kind == ord("_"):
        return None
    if kind == ord("#"):
        return line == "t"
    if kind == ord("-"):
        return _ErrorValue(line)
    return line


def _aggregate(kind: int, r: Reader, depth: int) -> Value:
    count = _length(r)
    if count < 0:
        return None
    if kind in (ord("%"), ord("|")):
        pairs = tuple((parse_value(r, depth + 1), parse_value(r, depth + 1)) for _ in range(count))
        # An attribute annotates the value after it: show that value.
        return parse_value(r, depth + 1) if kind == ord("|") else pairs
    return tuple(parse_value(r, depth + 1) for _ in range(count))


class _Scan:
    """Finds where a RESP value ends, resuming where the last feed left off.

    Without it a large reply arriving in small pieces would be re-parsed
    from its start on every piece.
    """

    __slots__ = ("offset", "pending")

    def __init__(self) -> None:
        self.offset = 0  # from the value's first byte
        self.pending = [1]  # values still expected, per open aggregate

    def complete(self, buf: bytearray, start: int) -> bool:
        while self.pending:
            at = start + self.offset
            line_end = buf.find(b"\r\n", at)
            if line_end < 0:
                return False
            kind = buf[at]
            if kind in _BULK:
                size = _length(Reader(buf, at + 1, line_end + 2))
                end = line_end + 2 + (size + 2 if size >= 0 else 0)
                if end > len(buf):
                    return False
                self.offset = end - start
                self._done()
            elif kind in _AGGREGATES:
                count = _length(Reader(buf, at + 1, line_end + 2))
                self.offset = line_end + 2 - start
                self._open(kind, count)
            elif kind in _SIMPLE:
                self.offset = line_end + 2 - start
                self._done()
            else:
                raise Malformed(f"unknown RESP type byte {kind:#x}")
        return True

    def _open(self, kind: int, count: int) -> None:
        self.pending[-1] -= 1
        children = count * 2 if kind in (ord("%"), ord("|")) else count
        if kind == ord("|"):  # an attribute is followed by the value it annotates
            children = max(children, 0) + 1
        if len(self.pending) > _MAX_DEPTH:
            raise Malformed("values nested too deep")
        self.pending.append(children)
        self._close()

    def _done(self) -> None:
        self.pending[-1] -= 1
        self._close()

    def _close(self) -> None:
        while self.pending and self.pending[-1] <= 0:
            self.pending.pop()


class RedisDecoder(Decoder):
    name = "redis"

    def __init__(self) -> None:
        super().__init__()
        self._scans = {d: _Scan() for d in Direction}

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        if buf[pos] in TYPE_BYTES:
            if not self._scans[direction].complete(buf, pos):
                return 0
            self._scans[direction] = _Scan()
        r = Reader(buf, pos, streaming=True)
        if direction is Direction.CLIENT:
            self._parse_command(r)
        else:
            self._parse_reply(r)
        return r.pos - pos

    def _parse_command(self, r: Reader) -> None:
        if r.peek() not in TYPE_BYTES:
            line = text(r.until(b"\n").rstrip(b"\r"))
            try:
                args = shlex.split(line)
            except ValueError:  # unbalanced quotes: Redis itself would reject it
                args = line.split()
            if args:
                self._emit(RedisCommand(direction=Direction.CLIENT, args=tuple(args)))
            return
        value = parse_value(r)
        args = value if isinstance(value, tuple) else (value,)
        self._emit(RedisCommand(direction=Direction.CLIENT, args=tuple(str(a) for a in args)))

    def _parse_reply(self, r: Reader) -> None:
        value = parse_value(r)
        if isinstance(value, _ErrorValue):
            code, _, _ = value.partition(" ")
            self._emit(Error(direction=Direction.SERVER, message=str(value), code=code))
        else:
            self._emit(RedisReply(direction=Direction.SERVER, value=_plain(value)))


def _plain(value: Value) -> Value:
    """Drop the private error marker inside aggregates, keep the text."""
    if isinstance(value, _ErrorValue):
        return f"(error) {value}"
    if isinstance(value, tuple):
        return tuple(_plain(v) for v in value)
    return value
