"""Shared vocabulary of the sans-IO protocol decoders.

Glossary:
  direction  which peer sent the bytes: ``Direction.CLIENT`` (client -> server)
             or ``Direction.SERVER`` (server -> client).
  decoder    one object per TCP session, both directions. It never does I/O
             and never reads a clock: bytes in, typed events out.
  event      a frozen, slotted, keyword-only dataclass; every one carries the
             ``direction`` of the bytes it was decoded from.
  mode       per direction: DECODE (parse messages), ENCRYPTED (count bytes),
             OPAQUE (pass bytes through), DELEGATE (an inner decoder, e.g. TLS
             after a PostgreSQL SSLRequest) or DEAD (after ``Undecodable``).

The API, the same for every decoder (h11 style)::

    decoder.feed(direction, data)   # buffers and parses; returns None
    decoder.end(direction)          # that peer closed its half (EOF)
    decoder.next_event()            # next Event, or None: feed more bytes

Events come out in the order their bytes were fed. Runs of encrypted or
opaque bytes of one direction are coalesced into one ``Encrypted`` /
``Opaque`` event, emitted when the other direction speaks, a decoded event
follows, or the direction ends; so the events do not depend on how the
stream was split into chunks.

Broken input never raises: the first malformed message of a direction
yields one ``Undecodable`` and that direction goes DEAD (its later bytes are
dropped). A truncated message left at ``end()`` yields ``Undecodable`` too.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

__all__ = [
    "Direction",
    "Event",
    "Query",
    "Prepare",
    "ResultSet",
    "CommandComplete",
    "Error",
    "Notice",
    "Startup",
    "Authentication",
    "AuthResponse",
    "Parameter",
    "Ready",
    "Message",
    "ProtocolSwitch",
    "Opaque",
    "Encrypted",
    "Undecodable",
    "Decoder",
    "EventQueue",
    "OpaqueDecoder",
    "Reader",
    "Malformed",
    "Incomplete",
    "Mode",
    "MAX_ROWS",
    "MAX_BODY",
    "text",
]

# A ResultSet keeps at most this many rows (row_count has the total): the raw
# record keeps every byte, the decoded view must stay renderable.
MAX_ROWS = 10_000
# Bodies (HTTP) and payload previews are cut here for the same reason.
MAX_BODY = 1 << 20


class Direction(enum.Enum):
    CLIENT = "c"
    SERVER = "s"

    @property
    def peer(self) -> Direction:
        return Direction.SERVER if self is Direction.CLIENT else Direction.CLIENT


def text(data: bytes) -> str:
    """Bytes as str for display: UTF-8, undecodable bytes escaped, never raises."""
    return data.decode("utf-8", errors="backslashreplace")


Pairs = tuple[tuple[str, str], ...]



@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    direction: Direction


@dataclass(frozen=True, slots=True, kw_only=True)
class Query(Event):
    """A statement the client executes (simple query, or execute of a prepared one)."""

    text: str
    params: tuple[str | None, ...] = ()
    statement: str | None = None  # prepared statement name/id, None for simple queries


@dataclass(frozen=True, slots=True, kw_only=True)
class Prepare(Event):
    statement: str
    text: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ResultSet(Event):
    columns: tuple[str, ...]
    rows: tuple[tuple[str | None, ...], ...]
    row_count: int  # may exceed len(rows): see MAX_ROWS


@dataclass(frozen=True, slots=True, kw_only=True)
class CommandComplete(Event):
    tag: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Error(Event):
    message: str
    code: str = ""
    fields: Pairs = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Notice(Event):
    message: str
    code: str = ""
    fields: Pairs = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Startup(Event):
    user: str
    database: str
    params: Pairs = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Authentication(Event):
    """The server asks for (or confirms) authentication."""

    method: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthResponse(Event):
    """The client answers an authentication request; secrets are not shown."""

    mechanism: str
    size: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Parameter(Event):
    name: str
    value: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Ready(Event):
    status: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Message(Event):
    """Any other protocol message, by its protocol name, with decoded fields."""

    name: str
    fields: Pairs = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class ProtocolSwitch(Event):
    """From here on the session speaks another protocol (tls, websocket, tunnel...)."""

    protocol: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Opaque(Event):
    """Bytes no decoder understands; shown as text/hex by a renderer."""

    data: bytes
    size: int  # may exceed len(data): see MAX_BODY


@dataclass(frozen=True, slots=True, kw_only=True)
class Encrypted(Event):
    byte_count: int


@dataclass(frozen=True, slots=True, kw_only=True)
class Undecodable(Event):
    reason: str
    offset: int  # byte offset in this direction's stream


class Malformed(Exception):
    """The bytes break the protocol: the decoder emits Undecodable."""


class Incomplete(Exception):
    """More bytes are needed before this message can be parsed."""


class Reader:
    """A cursor over a bytes-like buffer; every read is bounds-checked.

    Past the end it raises ``Incomplete`` when the message may simply not be
    all here yet (``streaming=True``), else ``Malformed``.
    """

    __slots__ = ("data", "pos", "end", "streaming")

    def __init__(
        self, data: bytes | bytearray, pos: int = 0, end: int | None = None, *, streaming: bool = False
    ) -> None:
        self.data = data
        self.pos = pos
        self.end = len(data) if end is None else end
        self.streaming = streaming

    @property
    def remaining(self) -> int:
        return self.end - self.pos

    def _short(self, what: str) -> Exception:
        return Incomplete() if self.streaming else Malformed(f"truncated {what}")

    def peek(self) -> int:
        """The next byte, not consumed."""
        if self.pos >= self.end:
            raise self._short("byte")
        return self.data[self.pos]

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > self.end:
            raise self._short(f"field of {n} bytes")
        out = bytes(self.data[self.pos : self.pos + n])
        self.pos += n
        return out

    def uint(self, n: int, *, little: bool = False) -> int:
        return int.from_bytes(self.take(n), "little" if little else "big")

    def u8(self) -> int:
        return self.uint(1)

    def u16(self) -> int:
        return self.uint(2)

    def u32(self) -> int:
        return self.uint(4)

    def i32(self) -> int:
        return int.from_bytes(self.take(4), "big", signed=True)

    def vec(self, length_bytes: int) -> bytes:
        """A big-endian length-prefixed byte string (TLS, SSH, DNS style)."""
        return self.take(self.uint(length_bytes))

    def until(self, sep: bytes) -> bytes:
        """Bytes up to ``sep`` (consumed, not returned)."""
        at = self.data.find(sep, self.pos, self.end)
        if at < 0:
            raise self._short("terminated field")
        out = bytes(self.data[self.pos : at])
        self.pos = at + len(sep)
        return out

    def cstring(self) -> str:
        return text(self.until(b"\0"))

    def rest(self) -> bytes:
        return self.take(self.remaining)

    def sub(self, n: int) -> Reader:
        """A reader over the next ``n`` bytes, which this one skips."""
        if n < 0 or self.pos + n > self.end:
            raise self._short(f"block of {n} bytes")
        inner = Reader(self.data, self.pos, self.pos + n)
        self.pos += n
        return inner


class Mode(enum.Enum):
    DECODE = "decode"
    ENCRYPTED = "encrypted"
    OPAQUE = "opaque"
    DELEGATE = "delegate"
    DEAD = "dead"


@dataclass(slots=True)
class _Stream:
    buf: bytearray = field(default_factory=bytearray)
    offset: int = 0  # stream offset of buf[0]
    mode: Mode = Mode.DECODE
    ended: bool = False


@dataclass(slots=True)
class _Run:
    """Coalesced encrypted/opaque bytes of one direction, not yet emitted."""

    direction: Direction
    mode: Mode
    size: int = 0
    data: bytearray = field(default_factory=bytearray)


class EventQueue:
    """Events decoded and not yet taken: the output half of every decoder."""

    def __init__(self) -> None:
        self._events: deque[Event] = deque()

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def events(self) -> list[Event]:
        """Every event available now (drains the queue)."""
        out = list(self._events)
        self._events.clear()
        return out


class Decoder(EventQueue):
    """Base of every decoder; subclasses implement ``_step`` (and maybe ``_on_end``)."""

    name: ClassVar[str] = ""

    def __init__(self) -> None:
        super().__init__()
        self._streams = {d: _Stream() for d in Direction}
        self._run: _Run | None = None
        self._inner: Decoder | None = None
        self._stepping = {d: False for d in Direction}

    # -- public API -----------------------------------------------------

    def feed(self, direction: Direction, data: bytes) -> None:
        stream = self._streams[direction]
        if stream.ended or not data:
            return
        if self._run is not None and self._run.direction is not direction:
            self._flush_run()
        if stream.mode is Mode.DECODE:
            stream.buf += data
            self._advance(direction)
        else:
            self._raw(direction, bytes(data))

    def end(self, direction: Direction) -> None:
        stream = self._streams[direction]
        if stream.ended:
            return
        if self._inner is not None and stream.mode is Mode.DELEGATE:
            self._inner.end(direction)
            self._drain_inner()
        self._flush_run()
        if stream.mode is Mode.DECODE:
            self._guard(direction, lambda: self._on_end(direction))
        if stream.mode is Mode.DECODE and stream.buf:
            self._emit(
                Undecodable(
                    direction=direction,
                    reason=f"stream ended inside a message ({len(stream.buf)} bytes left)",
                    offset=stream.offset,
                )
            )
        stream.buf.clear()
        stream.ended = True

    # -- for subclasses -------------------------------------------------

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        """Parse one message at ``buf[pos:]``; return bytes consumed (0: need more).

        May raise ``Incomplete`` (same as returning 0) or ``Malformed``.
        """
        raise NotImplementedError

    def _on_end(self, direction: Direction) -> None:
        """The peer closed ``direction``; complete what EOF completes."""

    def _emit(self, event: Event) -> None:
        if self._run is not None:
            self._flush_run()
        self._events.append(event)

    def _set_mode(self, direction: Direction, mode: Mode) -> None:
        """Switch ``direction``; its unparsed bytes follow the new mode.

        Called from inside ``_step`` of that direction, the bytes after the
        current message are handed over by ``_advance`` once it returns.
        """
        stream = self._streams[direction]
        stream.mode = mode
        if not self._stepping[direction] and stream.buf:
            leftover = bytes(stream.buf)
            stream.offset += len(leftover)
            stream.buf.clear()
            self._raw(direction, leftover)

    def _delegate(self, inner: Decoder) -> None:
        """Hand both directions, from the current position on, to ``inner``."""
        self._inner = inner
        for direction in Direction:
            self._set_mode(direction, Mode.DELEGATE)

    # -- machinery ------------------------------------------------------

    def _advance(self, direction: Direction) -> None:
        stream = self._streams[direction]
        pos = 0
        self._stepping[direction] = True
        try:
            while stream.mode is Mode.DECODE and pos < len(stream.buf):
                used = self._guard(direction, lambda: self._step_or_wait(direction, stream.buf, pos), pos)
                if not used:
                    break
                pos += used
        finally:
            self._stepping[direction] = False
        del stream.buf[:pos]
        stream.offset += pos
        if stream.mode is not Mode.DECODE and stream.buf:
            # The step switched mode mid-buffer: the rest belongs to the new mode.
            leftover = bytes(stream.buf)
            stream.buf.clear()
            stream.offset += len(leftover)
            self._raw(direction, leftover)

    def _step_or_wait(self, direction: Direction, buf: bytearray, pos: int) -> int:
        try:
            return self._step(direction, buf, pos)
        except Incomplete:
            return 0

    def _guard(self, direction: Direction, call: Callable[[], int | None], pos: int = 0) -> int:
        """Run a parse step; a Malformed (or ValueError) ends the direction."""
        try:
            return call() or 0
        except (Malformed, ValueError) as exc:
            stream = self._streams[direction]
            self._emit(
                Undecodable(direction=direction, reason=str(exc) or type(exc).__name__, offset=stream.offset + pos)
            )
            stream.mode = Mode.DEAD
            return 0

    def _raw(self, direction: Direction, data: bytes) -> None:
        mode = self._streams[direction].mode
        if mode is Mode.DELEGATE and self._inner is not None:
            self._inner.feed(direction, data)
            self._drain_inner()
        elif mode in (Mode.ENCRYPTED, Mode.OPAQUE):
            run = self._run
            if run is None or run.direction is not direction or run.mode is not mode:
                self._flush_run()
                run = self._run = _Run(direction, mode)
            run.size += len(data)
            if mode is Mode.OPAQUE and len(run.data) < MAX_BODY:
                run.data += data[: MAX_BODY - len(run.data)]

    def _flush_run(self) -> None:
        run, self._run = self._run, None
        if run is None or not run.size:
            return
        if run.mode is Mode.ENCRYPTED:
            self._events.append(Encrypted(direction=run.direction, byte_count=run.size))
        else:
            self._events.append(Opaque(direction=run.direction, data=bytes(run.data), size=run.size))

    def _drain_inner(self) -> None:
        assert self._inner is not None
        while (event := self._inner.next_event()) is not None:
            self._emit(event)


class OpaqueDecoder(Decoder):
    """The fallback: both directions are opaque bytes."""

    name = "opaque"

    def __init__(self) -> None:
        super().__init__()
        for direction in Direction:
            self._streams[direction].mode = Mode.OPAQUE
