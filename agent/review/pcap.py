"""A recorded session as a pcapng file Wireshark and tshark open as the
original conversation.

The store keeps the byte streams, not packets, so the packets are made up
around them: a TCP handshake at the session's open, one segment per record
(split at 65000 bytes, so an IPv4 packet never exceeds 64 KiB) with sequence
and acknowledgement numbers that follow the streams exactly, and a FIN
exchange at its close. Addresses and ports are the subject's and the
original destination's, so dissectors pick the protocol by its real port
(pgsql on 5432, http on 80). DNS over UDP sessions become one datagram per
record. Times are the records' times, in nanoseconds (if_tsresol 9).

pcapng layout (little endian): Section Header Block, one Interface
Description Block (LINKTYPE_RAW: packets start at the IP header), then one
Enhanced Packet Block a packet.
"""

from __future__ import annotations

import ipaddress
import struct
from typing import BinaryIO, Iterable, Iterator

from agent.store import Direction, Kind, Record

__all__ = ["pcapng_blocks", "write_pcapng", "MAX_SEGMENT", "LINKTYPE_RAW"]

LINKTYPE_RAW = 101
MAX_SEGMENT = 65000
_SHB, _IDB, _EPB = 0x0A0D0D0A, 0x00000001, 0x00000006
_BYTE_ORDER_MAGIC = 0x1A2B3C4D
_OPT_END, _OPT_SHB_USERAPPL, _OPT_IF_TSRESOL = 0, 4, 9
_FIN, _SYN, _RST, _PSH, _ACK = 0x01, 0x02, 0x04, 0x08, 0x10
_TCP, _UDP = 6, 17
_WINDOW_SHIFT = 7  # advertised in the SYNs, so 64 KiB segments fit the window
# Fixed initial sequence numbers: the conversation is synthetic anyway, and
# fixed numbers make two exports of one session byte-identical.
_ISN = {Direction.CLIENT: 1_000_000, Direction.SERVER: 2_000_000}

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


# -- pcapng blocks -----------------------------------------------------------------


def _pad4(data: bytes) -> bytes:
    return data + b"\0" * (-len(data) % 4)


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + _pad4(value)


def _block(kind: int, body: bytes) -> bytes:
    body = _pad4(body)
    total = 12 + len(body)
    return struct.pack("<II", kind, total) + body + struct.pack("<I", total)


def section_header() -> bytes:
    options = _option(_OPT_SHB_USERAPPL, b"tollgate export") + _option(_OPT_END, b"")
    # -1: section length not given (we stream)
    return _block(_SHB, struct.pack("<IHHq", _BYTE_ORDER_MAGIC, 1, 0, -1) + options)


def interface_description() -> bytes:
    options = _option(_OPT_IF_TSRESOL, bytes([9])) + _option(_OPT_END, b"")
    return _block(_IDB, struct.pack("<HHI", LINKTYPE_RAW, 0, 0) + options)


def enhanced_packet(ts_ns: int, packet: bytes) -> bytes:
    head = struct.pack("<IIIII", 0, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(packet), len(packet))
    return _block(_EPB, head + packet)


# -- IP, TCP and UDP ----------------------------------------------------------------


def _checksum(data: bytes) -> int:
    data = data + b"\0" * (len(data) % 2)
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def _pseudo_header(src: Address, dst: Address, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


def ip_packet(src: Address, dst: Address, proto: int, payload: bytes) -> bytes:
    if src.version == 4:
        head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0,
                           src.packed, dst.packed)
        return head[:10] + struct.pack("!H", _checksum(head)) + head[12:] + payload
    return struct.pack("!IHBB16s16s", 6 << 28, len(payload), proto, 64, src.packed, dst.packed) + payload


def _with_checksum(src: Address, dst: Address, proto: int, segment: bytes, at: int) -> bytes:
    """``segment`` with its transport checksum (at byte ``at``) filled in."""
    value = _checksum(_pseudo_header(src, dst, proto, len(segment)) + segment)
    if proto == _UDP and value == 0:
        value = 0xFFFF  # 0 means "no checksum" in UDP
    return segment[:at] + struct.pack("!H", value) + segment[at + 2:]


def tcp_segment(src: Address, dst: Address, ports: tuple[int, int], seq: int, ack: int, flags: int,
                payload: bytes = b"") -> bytes:
    options = b"\x01\x03\x03" + bytes([_WINDOW_SHIFT]) if flags & _SYN else b""
    offset = (20 + len(options)) // 4
    head = struct.pack("!HHIIBBHHH", ports[0], ports[1], seq & 0xFFFFFFFF, ack & 0xFFFFFFFF,
                       offset << 4, flags, 0xFFFF, 0, 0) + options
    return _with_checksum(src, dst, _TCP, head + payload, 16)


def udp_datagram(src: Address, dst: Address, ports: tuple[int, int], payload: bytes) -> bytes:
    head = struct.pack("!HHHH", ports[0], ports[1], 8 + len(payload), 0)
    return _with_checksum(src, dst, _UDP, head + payload, 6)


# -- the conversation ------------------------------------------------------------


def _addresses(client: str, server: str) -> tuple[Address, Address]:
    """Both ends in one IP version: a v4 peer of a v6 one is written v4-mapped."""
    a, b = ipaddress.ip_address(client), ipaddress.ip_address(server)
    a = a.ipv4_mapped or a if a.version == 6 and b.version == 4 else a
    b = b.ipv4_mapped or b if b.version == 6 and a.version == 4 else b
    if a.version != b.version:
        a, b = (ipaddress.IPv6Address(f"::ffff:{x}") if x.version == 4 else x for x in (a, b))
    return a, b


class Conversation:
    """Packets of one session: who sent what, numbered as TCP would."""

    def __init__(self, client: tuple[str, int], server: tuple[str, int], udp: bool = False) -> None:
        addr = _addresses(client[0], server[0])
        self.addr = {Direction.CLIENT: addr, Direction.SERVER: (addr[1], addr[0])}
        self.ports = {Direction.CLIENT: (client[1], server[1]), Direction.SERVER: (server[1], client[1])}
        self.udp = udp
        self.next = dict(_ISN)  # next sequence number each way

    def _tcp(self, d: Direction, flags: int, payload: bytes = b"") -> bytes:
        src, dst = self.addr[d]
        peer = Direction.SERVER if d == Direction.CLIENT else Direction.CLIENT
        ack = self.next[peer] if flags & _ACK else 0
        segment = tcp_segment(src, dst, self.ports[d], self.next[d], ack, flags, payload)
        self.next[d] += len(payload) + (1 if flags & (_SYN | _FIN) else 0)
        return ip_packet(src, dst, _TCP, segment)

    def open(self) -> list[bytes]:
        if self.udp:
            return []
        return [self._tcp(Direction.CLIENT, _SYN), self._tcp(Direction.SERVER, _SYN | _ACK),
                self._tcp(Direction.CLIENT, _ACK)]

    def data(self, d: Direction, payload: bytes) -> list[bytes]:
        if self.udp:
            src, dst = self.addr[d]
            return [ip_packet(src, dst, _UDP, udp_datagram(src, dst, self.ports[d], payload))]
        return [self._tcp(d, _PSH | _ACK, payload[at:at + MAX_SEGMENT])
                for at in range(0, len(payload), MAX_SEGMENT)]

    def close(self) -> list[bytes]:
        if self.udp:
            return []
        return [self._tcp(Direction.CLIENT, _FIN | _ACK), self._tcp(Direction.SERVER, _FIN | _ACK),
                self._tcp(Direction.CLIENT, _ACK)]


def _packets(records: Iterable[Record]) -> Iterator[tuple[int, bytes]]:
    conv: Conversation | None = None
    for r in records:
        if r.kind == Kind.SESSION_OPEN:
            j = r.json()
            conv = Conversation(tuple(j["client"]), tuple(j["original_dst"]), j.get("protocol") == "dns/udp")
            packets = conv.open()
        elif conv is None:
            continue
        elif r.kind == Kind.DATA:
            _, d, data = r.data()
            packets = conv.data(d, data)
        elif r.kind == Kind.SESSION_CLOSE:
            packets = conv.close()
        else:
            continue
        for i, packet in enumerate(packets):
            yield r.ts_ns + i, packet  # +1 ns each keeps the packets of one record in order


def pcapng_blocks(records: Iterable[Record]) -> Iterator[bytes]:
    """The whole file, block by block (a session of any size streams through)."""
    yield section_header()
    yield interface_description()
    for ts_ns, packet in _packets(records):
        yield enhanced_packet(ts_ns, packet)


def write_pcapng(records: Iterable[Record], out: BinaryIO) -> int:
    """Write the file; returns the number of packets."""
    count = -2
    for block in pcapng_blocks(records):
        out.write(block)
        count += 1
    return count
