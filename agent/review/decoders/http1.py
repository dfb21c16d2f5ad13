"""HTTP/1.0 and HTTP/1.1 (RFC 9112): messages, bodies, pipelining, upgrades.

Each direction is a small state machine: head -> body -> head. Body framing
follows RFC 9112 section 6.3: no body for responses to HEAD, 1xx, 204, 304;
chunked (with trailers); Content-Length; else (responses only) read to EOF.
Requests are remembered in order so pipelined responses know their method.
A 101 Switching Protocols, or a 2xx to CONNECT, turns both directions opaque.
Bodies are consumed as they arrive, so a large body is never re-parsed.
"""

from __future__ import annotations

import re
from collections import deque
from dataclasses import dataclass, field

from .base import (
    MAX_BODY, Decoder, Direction, Event, Incomplete, Malformed, Mode, ProtocolSwitch, Reader,
)

__all__ = ["HttpDecoder", "HttpRequest", "HttpResponse"]

Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpRequest(Event):
    method: str
    target: str
    version: str
    headers: Headers
    body: bytes = b""
    body_size: int = 0  # may exceed len(body): see MAX_BODY
    trailers: Headers = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class HttpResponse(Event):
    status: int
    reason: str
    version: str
    headers: Headers
    body: bytes = b""
    body_size: int = 0
    trailers: Headers = ()


_MAX_HEAD = 64 * 1024
_REQUEST_LINE = re.compile(rb"([!#$%&'*+\-.^_`|~0-9A-Za-z]+) (\S+) (HTTP/\d\.\d)")
_STATUS_LINE = re.compile(rb"(HTTP/\d\.\d) (\d{3})(?: (.*))?")


@dataclass(slots=True)
class _Message:
    """A message whose head is parsed and whose body is arriving."""

    start: tuple[str, str, str]  # method/target/version or version/status/reason
    headers: Headers
    framing: str  # none, length, chunked, eof
    remaining: int = 0  # body bytes left (length) or in the current chunk
    body: bytearray = field(default_factory=bytearray)
    size: int = 0
    trailers: Headers = ()
    chunk_state: str = "size"  # size, data, data-crlf, trailers


def _header(headers: Headers, name: str) -> str | None:
    for key, value in headers:
        if key.lower() == name:
            return value
    return None


def _head_lines(buf: bytearray, pos: int) -> tuple[list[bytes], int]:
    """The lines of a head ending at an empty line, and the bytes it spans."""
    end = buf.find(b"\n\r\n", pos)
    bare = buf.find(b"\n\n", pos)
    if end < 0 or 0 <= bare < end:
        end, skip = bare, 2
    else:
        skip = 3
    if end < 0:
        if len(buf) - pos > _MAX_HEAD:
            raise Malformed("message head too long")
        raise Incomplete
    lines = [line.rstrip(b"\r") for line in bytes(buf[pos:end]).split(b"\n")]
    return lines, end + skip - pos


def _parse_headers(lines: list[bytes]) -> Headers:
    out = []
    for line in lines:
        name, colon, value = line.partition(b":")
        if not colon or not name or name != name.strip():
            raise Malformed(f"bad header line {line[:40]!r}")
        out.append((name.decode("latin-1"), value.strip().decode("latin-1")))
    return tuple(out)


class HttpDecoder(Decoder):
    name = "http"

    def __init__(self) -> None:
        super().__init__()
        self._message: dict[Direction, _Message | None] = {d: None for d in Direction}
        self._methods: deque[str] = deque()  # of requests still awaiting a final response
        self._client_waits = False  # after CONNECT / Upgrade: hold client bytes until the answer

    # -- framing ------------------------------------------------------------

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        message = self._message[direction]
        if message is not None:
            return self._parse_body(direction, message, buf, pos)
        if direction is Direction.CLIENT and self._client_waits:
            return 0
        lines, used = _head_lines(buf, pos)
        if direction is Direction.CLIENT:
            self._parse_request_head(lines)
        else:
            self._parse_response_head(lines)
        return used

    def _parse_request_head(self, lines: list[bytes]) -> None:
        match = _REQUEST_LINE.fullmatch(lines[0])
        if not match:
            raise Malformed(f"bad request line {lines[0][:60]!r}")
        method, target, version = (part.decode("latin-1") for part in match.groups())
        headers = _parse_headers(lines[1:])
        self._methods.append(method)
        if method == "CONNECT" or _header(headers, "upgrade"):
            self._client_waits = True
        self._start(Direction.CLIENT, _Message((method, target, version), headers, self._framing(headers, request=True)))

    def _parse_response_head(self, lines: list[bytes]) -> None:
        match = _STATUS_LINE.fullmatch(lines[0])
        if not match:
            raise Malformed(f"bad status line {lines[0][:60]!r}")
        version, status, reason = match.group(1).decode(), int(match.group(2)), (match.group(3) or b"").decode("latin-1")
        headers = _parse_headers(lines[1:])
        method = self._methods[0] if self._methods else ""  # "" for an unasked response (408)
        if (status >= 200 or status == 101) and self._methods:
            self._methods.popleft()  # 1xx are interim: the request still awaits its answer
        switching = status == 101 or (method == "CONNECT" and 200 <= status < 300)
        if status < 200 or status in (204, 304) or method == "HEAD" or switching:
            framing = "none"
        else:
            framing = self._framing(headers, request=False)
        message = _Message((version, str(status), reason), headers, framing)
        self._start(Direction.SERVER, message)
        if switching:
            self._switch(_header(headers, "upgrade") or "tunnel")
        elif status >= 200 and self._client_waits:
            self._client_waits = False
            self._advance(Direction.CLIENT)  # the held bytes are HTTP after all

    def _framing(self, headers: Headers, *, request: bool) -> str:
        encoding = _header(headers, "transfer-encoding")
        if encoding is not None and "chunked" in encoding.lower():
            return "chunked"
        length = _header(headers, "content-length")
        if length is not None:
            if not length.strip().isdigit():
                raise Malformed(f"bad Content-Length {length!r}")
            return "length" if int(length) else "none"
        return "none" if request else "eof"

    def _start(self, direction: Direction, message: _Message) -> None:
        if message.framing == "length":
            message.remaining = int(_header(message.headers, "content-length") or 0)
        if message.framing == "none":
            self._finish(direction, message)
        else:
            self._message[direction] = message

    def _switch(self, protocol: str) -> None:
        self._client_waits = False
        self._emit(ProtocolSwitch(direction=Direction.SERVER, protocol=protocol.lower()))
        for direction in Direction:
            self._set_mode(direction, Mode.OPAQUE)

    # -- bodies -----------------------------------------------------------------

    def _take(self, message: _Message, data: bytes | bytearray) -> None:
        message.size += len(data)
        room = MAX_BODY - len(message.body)
        if room > 0:
            message.body += data[:room]

    def _parse_body(self, direction: Direction, message: _Message, buf: bytearray, pos: int) -> int:
        if message.framing == "eof":
            self._take(message, buf[pos:])
            return len(buf) - pos
        if message.framing == "length":
            used = min(message.remaining, len(buf) - pos)
            self._take(message, buf[pos : pos + used])
            message.remaining -= used
            if not message.remaining:
                self._finish(direction, message)
            return used
        return self._parse_chunked(direction, message, buf, pos)

    def _parse_chunked(self, direction: Direction, message: _Message, buf: bytearray, pos: int) -> int:
        state = message.chunk_state
        if state == "data":
            used = min(message.remaining, len(buf) - pos)
            self._take(message, buf[pos : pos + used])
            message.remaining -= used
            if not message.remaining:
                message.chunk_state = "data-crlf"
            return used
        if state == "trailers":
            return self._parse_trailers(direction, message, buf, pos)
        line = Reader(buf, pos, streaming=True).until(b"\n")
        used = len(line) + 1
        line = line.rstrip(b"\r")
        if state == "data-crlf":
            if line:
                raise Malformed("chunk data longer than its size")
            message.chunk_state = "size"
            return used
        size_text = line.split(b";", 1)[0].strip()
        if not size_text or len(size_text) > 16:
            raise Malformed(f"bad chunk size {line[:20]!r}")
        message.remaining = int(size_text, 16)
        message.chunk_state = "data" if message.remaining else "trailers"
        return used

    def _parse_trailers(self, direction: Direction, message: _Message, buf: bytearray, pos: int) -> int:
        for blank in (b"\r\n", b"\n"):
            if buf.startswith(blank, pos):
                self._finish(direction, message)
                return len(blank)
        lines, used = _head_lines(buf, pos)
        message.trailers = _parse_headers(lines)
        self._finish(direction, message)
        return used

    def _finish(self, direction: Direction, message: _Message) -> None:
        self._message[direction] = None
        first, second, third = message.start
        body = {"body": bytes(message.body), "body_size": message.size, "trailers": message.trailers}
        if direction is Direction.CLIENT:
            self._emit(HttpRequest(direction=direction, method=first, target=second, version=third, headers=message.headers, **body))
        else:
            self._emit(HttpResponse(direction=direction, status=int(second), reason=third, version=first, headers=message.headers, **body))

    def _on_end(self, direction: Direction) -> None:
        message = self._message[direction]
        if message is not None and message.framing == "eof":
            self._finish(direction, message)
