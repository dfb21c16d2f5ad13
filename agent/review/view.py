"""A session's records turned into timestamped items a renderer shows.

``SessionView.add(record)`` takes the records of one session in store order
(all at once for a replay, as they arrive for ``--follow``) and returns the
items they complete: ``Opened``, ``Attributed``, ``Detected``, ``Decoded``
(a decoder event), ``Raw`` (bytes shown as text) and ``Closed``. A decoded
event carries the time of the record that completed it.

Where decoding stops (an ``Undecodable``, a decoder failure, a protocol no
decoder knows) the bytes of that direction from there on become ``Raw``
items, so nothing recorded is missing from the view. ``decode=False`` makes
every byte ``Raw``: the plain text view.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

from agent.review.decoders import Direction, Encrypted, Event, Opaque, SessionDecoder, Undecodable
from agent.store import Direction as StoreDirection
from agent.store import Kind, Record

__all__ = ["Item", "Opened", "Attributed", "Detected", "Decoded", "Raw", "Closed", "HandedOver",
           "SessionView", "view_items", "DIRECTION", "decoder_protocol"]

DIRECTION = {StoreDirection.CLIENT: Direction.CLIENT, StoreDirection.SERVER: Direction.SERVER}
# Bytes per direction kept to show as text when decoding stops mid-message.
RECENT_BYTES = 1 << 20
# SESSION_OPEN "protocol" values that name the decoder outright.
_OPEN_PROTOCOLS = {"dns/udp": "dns-udp"}


@dataclass(frozen=True, slots=True)
class Item:
    ts_ns: int


@dataclass(frozen=True, slots=True)
class Opened(Item):
    session: int
    client: tuple[str, int]
    original_dst: tuple[str, int]
    protocol: str | None  # as the proxy recorded it (only DNS over UDP says)


@dataclass(frozen=True, slots=True)
class Attributed(Item):
    info: dict


@dataclass(frozen=True, slots=True)
class Detected(Item):
    protocol: str


@dataclass(frozen=True, slots=True)
class Decoded(Item):
    event: Event


@dataclass(frozen=True, slots=True)
class Raw(Item):
    direction: Direction
    data: bytes
    offset: int  # where these bytes start in their direction's stream


@dataclass(frozen=True, slots=True)
class Closed(Item):
    close: dict


@dataclass(frozen=True, slots=True)
class HandedOver(Item):
    """The agent restarted with the session open: it went on through the next run."""
    what: str    # the event: sessions_handed_over (the stopping run) or sessions_resumed (the next)
    pending: tuple[int, int] = (0, 0)   # recorded, not yet sent: to the server, to the client


def decoder_protocol(open_protocol: str | None) -> str | None:
    """The decoder a SESSION_OPEN's own protocol field asks for, if any."""
    return _OPEN_PROTOCOLS.get(open_protocol or "")


class SessionView:
    """Records of one session in, items out; never raises on recorded bytes."""

    def __init__(self, decode: bool = True) -> None:
        self._decode = decode
        self._decoder: SessionDecoder | None = None
        self._protocol: str | None = None
        self._fed = {d: 0 for d in Direction}
        self._recent: dict[Direction, deque[tuple[int, int, bytes]]] = {d: deque() for d in Direction}
        self._recent_size = {d: 0 for d in Direction}
        # direction -> stream offset from which its bytes are shown raw
        self._raw_from: dict[Direction, int] = {} if decode else {d: 0 for d in Direction}
        self.closed = False
        self.session: int | None = None     # known from its SESSION_OPEN

    @property
    def protocol(self) -> str | None:
        """The decoder's protocol once detected (``opaque`` when none fits)."""
        return self._protocol

    def add(self, r: Record) -> list[Item]:
        if r.kind == Kind.SESSION_OPEN:
            return [self._open(r)]
        if r.kind == Kind.SESSION_INFO:
            return [Attributed(r.ts_ns, r.json())]
        if r.kind == Kind.DATA:
            _, d, data = r.data()
            return self._data(r.ts_ns, DIRECTION[d], data)
        if r.kind == Kind.SESSION_CLOSE:
            items = self.finish(r.ts_ns)
            self.closed = True
            return [*items, Closed(r.ts_ns, r.json())]
        if r.kind == Kind.EVENT:     # only a hand-over reaches a session's view
            j = r.json()
            pending = (j.get("pending") or {}).get(str(self.session))
            return [HandedOver(r.ts_ns, j.get("event", "?"), tuple(pending) if pending else (0, 0))]
        return []

    def finish(self, ts_ns: int) -> list[Item]:
        """End both directions (close, or the end of a live view): what EOF completes."""
        if self._decoder is None or self.closed:
            return []
        for d in Direction:
            self._decoder.end(d)
        return self._drain(ts_ns)

    def _open(self, r: Record) -> Opened:
        self.session = r.seq
        j = r.json()
        dst = tuple(j["original_dst"])
        if self._decode:
            self._decoder = SessionDecoder(port=dst[1], protocol=decoder_protocol(j.get("protocol")))
        return Opened(r.ts_ns, r.seq, tuple(j["client"]), dst, j.get("protocol"))

    def _data(self, ts_ns: int, d: Direction, data: bytes) -> list[Item]:
        offset = self._fed[d]
        self._fed[d] += len(data)
        if d in self._raw_from or self._decoder is None:
            return [Raw(ts_ns, d, data, offset)]
        self._remember(d, ts_ns, offset, data)
        self._decoder.feed(d, data)
        return self._drain(ts_ns)

    def _remember(self, d: Direction, ts_ns: int, offset: int, data: bytes) -> None:
        recent = self._recent[d]
        recent.append((ts_ns, offset, data))
        self._recent_size[d] += len(data)
        while len(recent) > 1 and self._recent_size[d] - len(recent[0][2]) >= RECENT_BYTES:
            self._recent_size[d] -= len(recent.popleft()[2])

    def _drain(self, ts_ns: int) -> list[Item]:
        assert self._decoder is not None
        events = list(iter(self._decoder.next_event, None))
        items = self._protocol_change(ts_ns, events)
        for event in events:
            items += self._event(ts_ns, event)
        return items

    def _event(self, ts_ns: int, event: Event) -> list[Item]:
        d = event.direction
        if d in self._raw_from and isinstance(event, (Opaque, Encrypted)):
            return []  # these bytes are shown as Raw items
        items: list[Item] = [Decoded(ts_ns, event)]
        if isinstance(event, Undecodable) and d not in self._raw_from:
            items += self._go_raw(d, event.offset)
        return items

    def _protocol_change(self, ts_ns: int, events: list[Event]) -> list[Item]:
        protocol = self._decoder.protocol if self._decoder else None
        if protocol is None or protocol == self._protocol:
            return []
        first, self._protocol = self._protocol is None, protocol
        items: list[Item] = [Detected(ts_ns, protocol)]
        if protocol != "opaque":
            return items
        # No decoder (left): bytes are shown as recorded, from the start when
        # nothing was decoded, else from where the failed decoder stopped.
        # A direction with an Undecodable goes raw at that event (see _event).
        stopped = {e.direction for e in events if isinstance(e, Undecodable)}
        for d in Direction:
            if d not in self._raw_from and (first or d not in stopped):
                items += self._go_raw(d, 0 if first else self._fed[d])
        return items

    def _go_raw(self, d: Direction, offset: int) -> list[Raw]:
        """Show ``d`` raw from ``offset`` on, starting with the bytes already fed."""
        self._raw_from[d] = offset
        out = []
        for ts_ns, start, data in self._recent[d]:
            if start + len(data) > offset:
                skip = max(0, offset - start)
                out.append(Raw(ts_ns, d, data[skip:], start + skip))
        self._recent[d].clear()
        return out


def view_items(records: Iterable[Record], decode: bool = True) -> Iterator[Item]:
    """Every item of a session's records, in order."""
    view = SessionView(decode)
    last_ts = 0
    for r in records:
        last_ts = r.ts_ns
        yield from view.add(r)
    yield from view.finish(last_ts)
