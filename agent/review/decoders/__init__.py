"""Sans-IO protocol decoders: one TCP session's bytes in, typed events out.

- ``detect(client_first, server_first, port=None)`` names the protocol from
  the first bytes of each direction (the port only breaks ties);
- ``decoder_for(name)`` makes that protocol's decoder (see ``base`` for the
  feed / end / next_event API every decoder shares);
- ``SessionDecoder`` does both as bytes arrive (for live follow) and never
  raises: a decoder bug becomes ``Undecodable`` and the rest is ``Opaque``;
- ``decode_session(chunks)`` runs a whole recorded session through it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

from .base import (
    MAX_BODY, MAX_ROWS, Authentication, AuthResponse, CommandComplete, Decoder, Direction, Encrypted, Error,
    Event, EventQueue, Message, Notice, Opaque, OpaqueDecoder, Parameter, Prepare, ProtocolSwitch, Query, Ready,
    ResultSet, Startup, Undecodable,
)
from .dns import DnsDatagramDecoder, DnsDecoder, DnsMessage, DnsQuestion, DnsRecord, parse_message
from .http1 import HttpDecoder, HttpRequest, HttpResponse
from .mysql import Greeting, MysqlDecoder
from .postgres import PostgresDecoder
from .redis import TYPE_BYTES as _RESP_TYPE_BYTES
from .redis import RedisCommand, RedisDecoder, RedisReply
from .ssh import SshBanner, SshDecoder, SshKexInit
from .tls import TlsCertificate, TlsClientHello, TlsDecoder, TlsServerHello

__all__ = [
    # API
    "Direction", "Decoder", "SessionDecoder", "DECODERS", "DETECT_BYTES", "detect", "decoder_for",
    "decode_session", "parse_message", "MAX_ROWS", "MAX_BODY",
    # decoders
    "PostgresDecoder", "MysqlDecoder", "HttpDecoder", "RedisDecoder", "TlsDecoder", "SshDecoder",
    "DnsDecoder", "DnsDatagramDecoder", "OpaqueDecoder",
    # events
    "Event", "Query", "Prepare", "ResultSet", "CommandComplete", "Error", "Notice", "Startup",
    "Authentication", "AuthResponse", "Parameter", "Ready", "Message", "ProtocolSwitch", "Opaque",
    "Encrypted", "Undecodable", "Greeting", "HttpRequest", "HttpResponse", "RedisCommand", "RedisReply",
    "TlsClientHello", "TlsServerHello", "TlsCertificate", "SshBanner", "SshKexInit", "DnsMessage",
    "DnsQuestion", "DnsRecord",
]

DECODERS: dict[str, type[Decoder]] = {
    cls.name: cls
    for cls in (
        PostgresDecoder, MysqlDecoder, HttpDecoder, RedisDecoder, TlsDecoder, SshDecoder, DnsDecoder,
        DnsDatagramDecoder, OpaqueDecoder,
    )
}


def decoder_for(name: str) -> Decoder:
    """A fresh decoder for a protocol name of ``DECODERS``; KeyError if unknown."""
    return DECODERS[name]()


# -- detection -------------------------------------------------------------------

# detect() looks at this many first bytes of each direction, no more, so its
# answer does not depend on how the bytes were chunked.
DETECT_BYTES = 256
_PORT_HINTS = {5432: "postgres", 3306: "mysql", 80: "http", 8080: "http", 6379: "redis", 443: "tls", 22: "ssh", 53: "dns"}
_HTTP_METHODS = (b"GET", b"POST", b"PUT", b"DELETE", b"HEAD", b"OPTIONS", b"PATCH", b"CONNECT", b"TRACE")
_REQUEST_LINE = re.compile(rb"[A-Z][A-Z-]{1,19} \S+ HTTP/1\.[01]\r?\n")
_REDIS_INLINE = {b"PING", b"AUTH", b"HELLO", b"INFO", b"GET", b"SET", b"ECHO", b"QUIT", b"SELECT", b"KEYS"}


def _u32(data: bytes, at: int) -> int:
    return int.from_bytes(data[at : at + 4], "big")


def _is_ssh(c: bytes, s: bytes) -> bool:
    return c.startswith(b"SSH-") or s.startswith(b"SSH-")


def _is_tls(c: bytes, s: bytes) -> bool:
    return len(c) >= 3 and c[0] == 0x16 and c[1] == 0x03 and c[2] <= 0x04


def _is_postgres(c: bytes, s: bytes) -> bool:
    if len(c) < 8:
        return False
    length, code = _u32(c, 0), _u32(c, 4)
    if length == 8 and code in (80877103, 80877104):  # SSLRequest, GSSENCRequest
        return True
    if length == 16 and code == 80877102:  # CancelRequest
        return True
    return code == 196608 and 8 < length < 10_000 and b"user\0" in c


def _is_mysql(c: bytes, s: bytes) -> bool:
    if len(s) < 6 or s[3] != 0:  # sequence id 0: the server's first packet
        return False
    length = int.from_bytes(s[:3], "little")
    if s[4] == 0xFF:  # an error greeting ("host not allowed")
        return 3 <= length < 1024
    version_end = s.find(b"\0", 5)
    return s[4] == 10 and 20 < length < 1024 and 5 < version_end < 60 and s[5:version_end].isascii()


def _is_http(c: bytes, s: bytes) -> bool:
    if _REQUEST_LINE.match(c):
        return True
    method = c.split(b" ", 1)[0]
    return (method in _HTTP_METHODS and c[len(method) : len(method) + 2] in (b" /", b" h")) or s.startswith(b"HTTP/1.")


def _is_redis(c: bytes, s: bytes) -> bool:
    if re.match(rb"\*\d{1,6}\r\n\$\d{1,9}\r\n", c):
        return True
    word = c.split(b"\r\n", 1)[0].split(b" ", 1)[0].upper()
    return word in _REDIS_INLINE and c[len(word) : len(word) + 1] in (b" ", b"\r", b"\n") and s[:1] != b"" and s[0] in _RESP_TYPE_BYTES


def _is_dns(c: bytes, s: bytes) -> bool:
    if len(c) < 14:
        return False
    length = int.from_bytes(c[:2], "big")
    flags = int.from_bytes(c[4:6], "big")
    counts = [int.from_bytes(c[i : i + 2], "big") for i in range(6, 14, 2)]
    # a query: QR=0, standard opcode, one question, no answers, maybe an OPT record
    return 17 <= length <= 4096 and not flags & 0xF800 and counts[:3] == [1, 0, 0] and counts[3] <= 2


_DETECTORS: tuple[tuple[str, Callable[[bytes, bytes], bool]], ...] = (
    ("ssh", _is_ssh), ("tls", _is_tls), ("postgres", _is_postgres), ("mysql", _is_mysql),
    ("http", _is_http), ("redis", _is_redis), ("dns", _is_dns),
)


def detect(client_first: bytes, server_first: bytes, port: int | None = None) -> str | None:
    """The protocol of a TCP session from its first bytes, or None if unknown.

    ``port`` (the original destination port) only breaks ties between
    protocols the bytes fit equally.
    """
    c, s = bytes(client_first[:DETECT_BYTES]), bytes(server_first[:DETECT_BYTES])
    matches = [name for name, fits in _DETECTORS if fits(c, s)]
    if not matches:
        return None
    hinted = _PORT_HINTS.get(port or -1)
    return hinted if hinted in matches else matches[0]


# -- a whole session -------------------------------------------------------------


class SessionDecoder(EventQueue):
    """Detect, then decode, as bytes arrive; same feed/end/next_event API; never raises.

    Detection waits until both directions have spoken, one has sent
    DETECT_BYTES, or a direction ends. Unknown protocols are ``Opaque``.
    """

    def __init__(self, *, port: int | None = None, protocol: str | None = None) -> None:
        super().__init__()
        self._port = port
        self._decoder: Decoder | None = decoder_for(protocol) if protocol else None
        self.protocol: str | None = protocol
        self._first = {d: bytearray() for d in Direction}
        self._held: list[tuple[Direction, bytes]] = []
        self._fed = {d: 0 for d in Direction}  # bytes per direction, for Undecodable offsets
        self._ended: set[Direction] = set()

    def feed(self, direction: Direction, data: bytes) -> None:
        if self._decoder is None:
            self._held.append((direction, bytes(data)))
            first = self._first[direction]
            first += data[: max(0, DETECT_BYTES - len(first))]
            if all(self._first.values()) or len(first) >= DETECT_BYTES:
                self._decide()
            return
        self._run(direction, lambda: self._decoder.feed(direction, data))
        self._fed[direction] += len(data)

    def end(self, direction: Direction) -> None:
        if direction in self._ended:
            return
        self._ended.add(direction)
        if self._decoder is None:
            self._decide()
        self._run(direction, lambda: self._decoder.end(direction))

    def _decide(self) -> None:
        client, server = (bytes(self._first[d]) for d in Direction)
        self.protocol = detect(client, server, self._port) or "opaque"
        self._decoder = decoder_for(self.protocol)
        held, self._held = self._held, []
        for direction, data in held:
            self.feed(direction, data)

    def _run(self, direction: Direction, call: Callable[[], None]) -> None:
        assert self._decoder is not None
        try:
            call()
            while (event := self._decoder.next_event()) is not None:
                self._events.append(event)
        except Exception as exc:  # a decoder bug must not cost the rest of the view
            reason = f"{self.protocol} decoder failed: {type(exc).__name__}: {exc}"
            self._events.append(Undecodable(direction=direction, reason=reason, offset=self._fed[direction]))
            self._decoder = OpaqueDecoder()
            self.protocol = "opaque"


def decode_session(
    chunks: Iterable[tuple[Direction, bytes]], *, port: int | None = None, protocol: str | None = None
) -> list[Event]:
    """Every event of a recorded session; ends both directions after the last chunk."""
    session = SessionDecoder(port=port, protocol=protocol)
    for direction, data in chunks:
        session.feed(direction, data)
    for direction in Direction:
        session.end(direction)
    return session.events()
