"""DNS messages (RFC 1035): over TCP (2-byte length prefix) or as UDP datagrams.

Names may use compression pointers; each must point strictly before where
the name (or the previous pointer's target) began, which rules out loops, and a name is at most 255
bytes. ``parse_message`` decodes one message; the decoders frame them.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from .base import Decoder, Direction, Event, Malformed, Reader, Undecodable, text

__all__ = ["DnsDecoder", "DnsDatagramDecoder", "DnsMessage", "DnsQuestion", "DnsRecord", "parse_message"]


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsQuestion:
    name: str
    type: str
    cls: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsRecord:
    name: str
    type: str
    cls: str
    ttl: int
    data: str


@dataclass(frozen=True, slots=True, kw_only=True)
class DnsMessage(Event):
    id: int
    is_response: bool
    opcode: int
    rcode: str
    flags: tuple[str, ...]
    questions: tuple[DnsQuestion, ...]
    answers: tuple[DnsRecord, ...]
    authority: tuple[DnsRecord, ...] = ()
    additional: tuple[DnsRecord, ...] = ()


_TYPES = {
    1: "A", 2: "NS", 5: "CNAME", 6: "SOA", 12: "PTR", 13: "HINFO", 15: "MX", 16: "TXT", 28: "AAAA", 33: "SRV",
    35: "NAPTR", 41: "OPT", 43: "DS", 46: "RRSIG", 47: "NSEC", 48: "DNSKEY", 64: "SVCB", 65: "HTTPS", 99: "SPF",
    252: "AXFR", 255: "ANY", 257: "CAA",
}
_CLASSES = {1: "IN", 3: "CH", 4: "HS", 255: "ANY"}
_RCODES = {0: "NOERROR", 1: "FORMERR", 2: "SERVFAIL", 3: "NXDOMAIN", 4: "NOTIMP", 5: "REFUSED"}
_FLAGS = ((0x0400, "aa"), (0x0200, "tc"), (0x0100, "rd"), (0x0080, "ra"), (0x0020, "ad"), (0x0010, "cd"))


def _name(r: Reader) -> str:
    labels: list[str] = []
    size = 0
    pos, resume = r.pos, None
    limit = pos  # each pointer must jump before the last place we jumped to: no loops
    while True:
        if pos >= r.end:
            raise Malformed("name runs past the message")
        length = r.data[pos]
        if length & 0xC0 == 0xC0:
            if pos + 1 >= r.end:
                raise Malformed("truncated compression pointer")
            target = (length & 0x3F) << 8 | r.data[pos + 1]
            if target >= limit:
                raise Malformed("compression pointer does not point backwards")
            resume = pos + 2 if resume is None else resume
            pos = limit = target
            continue
        if length & 0xC0:
            raise Malformed(f"label type {length:#x}")
        if length == 0:
            break
        label = bytes(r.data[pos + 1 : pos + 1 + length])
        if len(label) != length:
            raise Malformed("label runs past the message")
        size += length + 1
        if size > 255:
            raise Malformed("name longer than 255 bytes")
        labels.append(text(label))
        pos += 1 + length
    r.pos = pos + 1 if resume is None else resume
    return ".".join(labels) + "." if labels else "."


def _type(value: int) -> str:
    return _TYPES.get(value, f"TYPE{value}")


def _rdata(kind: int, r: Reader) -> str:
    if kind == 1 and r.remaining == 4:
        return str(ipaddress.IPv4Address(r.take(4)))
    if kind == 28 and r.remaining == 16:
        return str(ipaddress.IPv6Address(r.take(16)))
    if kind in (2, 5, 12):
        return _name(r)
    if kind == 15:
        return f"{r.u16()} {_name(r)}"
    if kind == 33:
        return f"{r.u16()} {r.u16()} {r.u16()} {_name(r)}"
    if kind == 6:
        return f"{_name(r)} {_name(r)} " + " ".join(str(r.u32()) for _ in range(5))
    if kind in (16, 99):
        parts = []
        while r.remaining:
            parts.append('"' + text(r.vec(1)) + '"')
        return " ".join(parts)
    return r.rest().hex()


def _question(r: Reader) -> DnsQuestion:
    name = _name(r)
    kind, cls = r.u16(), r.u16()
    return DnsQuestion(name=name, type=_type(kind), cls=_CLASSES.get(cls, f"CLASS{cls}"))


def _record(r: Reader) -> DnsRecord:
    name = _name(r)
    kind, cls, ttl = r.u16(), r.u16(), r.u32()
    length = r.u16()
    if r.pos + length > r.end:
        raise Malformed("record data runs past the message")
    # rdata may point back into the whole message, so read it in place
    data = Reader(r.data, r.pos, r.pos + length)
    r.pos += length
    value = _rdata(kind, data)
    # OPT (EDNS0) reuses class as the UDP payload size
    cls_name = str(cls) if kind == 41 else _CLASSES.get(cls, f"CLASS{cls}")
    return DnsRecord(name=name, type=_type(kind), cls=cls_name, ttl=ttl, data=value)


def parse_message(direction: Direction, data: bytes) -> DnsMessage:
    """Decode one DNS message; raises ``Malformed`` on broken bytes."""
    r = Reader(data)
    ident, flags = r.u16(), r.u16()
    counts = [r.u16() for _ in range(4)]
    questions = tuple(_question(r) for _ in range(counts[0]))
    sections = [tuple(_record(r) for _ in range(count)) for count in counts[1:]]
    return DnsMessage(
        direction=direction,
        id=ident,
        is_response=bool(flags & 0x8000),
        opcode=flags >> 11 & 0xF,
        rcode=_RCODES.get(flags & 0xF, str(flags & 0xF)),
        flags=tuple(name for bit, name in _FLAGS if flags & bit),
        questions=questions,
        answers=sections[0],
        authority=sections[1],
        additional=sections[2],
    )


class DnsDecoder(Decoder):
    """DNS over TCP: each message has a 2-byte length prefix."""

    name = "dns"

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        head = Reader(buf, pos, streaming=True)
        message = head.vec(2)
        self._emit(parse_message(direction, message))
        return head.pos - pos


class DnsDatagramDecoder(Decoder):
    """DNS over UDP: each ``feed`` is one datagram; a bad one does not stop the next."""

    name = "dns-udp"

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        try:
            self._emit(parse_message(direction, bytes(buf[pos:])))
        except Malformed as exc:
            offset = self._streams[direction].offset + pos
            self._emit(Undecodable(direction=direction, reason=str(exc), offset=offset))
        return len(buf) - pos
