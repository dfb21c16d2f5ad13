"""MySQL / MariaDB client/server protocol (protocol 10, CLIENT_PROTOCOL_41).

Packets are ``3-byte length, sequence id, payload``. The server speaks first
(handshake v10); the client's HandshakeResponse41 names user and database,
or, cut short with CLIENT_SSL, asks for TLS (handed to the TLS decoder).
After authentication each client packet with sequence id 0 is a command; the
server's packets are read according to the command they answer (phase),
e.g. a COM_QUERY answer is OK, ERR, or column count, column definitions,
[EOF], rows, EOF/OK — the EOFs depend on CLIENT_DEPRECATE_EOF.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .base import (
    MAX_ROWS, Authentication, AuthResponse, CommandComplete, Decoder, Direction, Error, Event, Malformed,
    Message, Prepare, ProtocolSwitch, Query, Reader, ResultSet, Startup, text,
)
from .tls import TlsDecoder

__all__ = ["MysqlDecoder", "Greeting"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Greeting(Event):
    """The server's initial handshake."""

    server_version: str
    connection_id: int
    auth_plugin: str


_CONNECT_WITH_DB = 0x8
_PROTOCOL_41 = 0x200
_SSL = 0x800
_SECURE_CONNECTION = 0x8000
_MORE_RESULTS = 0x8  # server status flag
_PLUGIN_AUTH = 0x80000
_CONNECT_ATTRS = 0x100000
_LENENC_AUTH_DATA = 0x200000
_SESSION_TRACK = 0x800000
_DEPRECATE_EOF = 0x1000000
# MariaDB extended capabilities (the greeting's and the response's last filler bytes).
_MARIADB_EXTENDED_METADATA = 0x08
_MARIADB_CACHE_METADATA = 0x10

_COMMANDS = {
    0x01: "COM_QUIT", 0x02: "COM_INIT_DB", 0x03: "COM_QUERY", 0x04: "COM_FIELD_LIST", 0x08: "COM_SHUTDOWN",
    0x09: "COM_STATISTICS", 0x0C: "COM_PROCESS_KILL", 0x0E: "COM_PING", 0x11: "COM_CHANGE_USER",
    0x16: "COM_STMT_PREPARE", 0x17: "COM_STMT_EXECUTE", 0x18: "COM_STMT_SEND_LONG_DATA",
    0x19: "COM_STMT_CLOSE", 0x1A: "COM_STMT_RESET", 0x1B: "COM_SET_OPTION", 0x1C: "COM_STMT_FETCH",
    0x1F: "COM_RESET_CONNECTION",
}
# Commands the server does not answer.
_SILENT = {0x01, 0x18, 0x19}

# Binary-protocol types: fixed-size integers and floats (size, struct code).
_FIXED = {
    0x01: (1, "b"), 0x02: (2, "h"), 0x0D: (2, "h"), 0x03: (4, "i"), 0x09: (4, "i"), 0x08: (8, "q"),
    0x04: (4, "f"), 0x05: (8, "d"),
}
_DATE_TYPES = {0x07, 0x0A, 0x0C}  # TIMESTAMP, DATE, DATETIME
_TIME = 0x0B
_NULL_TYPE = 0x06
_UNSIGNED_FLAG = 0x20


def _lenenc_int(r: Reader) -> int | None:
    first = r.u8()
    if first < 0xFB:
        return first
    if first == 0xFB:
        return None  # NULL in a text row
    if first == 0xFF:
        raise Malformed("length-encoded integer 0xff")
    return r.uint({0xFC: 2, 0xFD: 3, 0xFE: 8}[first], little=True)


def _lenenc_bytes(r: Reader) -> bytes | None:
    size = _lenenc_int(r)
    return None if size is None else r.take(size)


def _lenenc_str(r: Reader) -> str:
    return text(_lenenc_bytes(r) or b"")


@dataclass(slots=True)
class _Column:
    name: str
    type: int
    unsigned: bool


@dataclass(slots=True)
class _Statement:
    text: str
    params: int = 0
    types: list[tuple[int, bool]] = field(default_factory=list)
    columns: list[_Column] = field(default_factory=list)


@dataclass(slots=True)
class _Answer:
    """What the server's next packets answer, and how far through it we are."""

    command: int
    stage: str = "first"  # first, params, columns, rows, prepare-params, prepare-columns
    columns: list[_Column] = field(default_factory=list)
    expected: int = 0  # definitions still to come in this stage
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    count: int = 0
    statement: _Statement | None = None
    statement_id: int = 0


def _binary_value(r: Reader, column: _Column) -> str | None:
    kind = column.type
    if kind == _NULL_TYPE:
        return None
    if kind in _FIXED:
        size, code = _FIXED[kind]
        if column.unsigned and code in "bhiq":
            code = code.upper()
        value = struct.unpack("<" + code, r.take(size))[0]
        return repr(value) if code in "fd" else str(value)
    if kind in _DATE_TYPES:
        return _binary_datetime(r.vec(1))
    if kind == _TIME:
        return _binary_time(r.vec(1))
    return text(_lenenc_bytes(r) or b"")


def _binary_datetime(raw: bytes) -> str:
    r = Reader(raw)
    if not raw:
        return "0000-00-00"
    out = f"{r.uint(2, little=True):04d}-{r.u8():02d}-{r.u8():02d}"
    if r.remaining >= 3:
        out += f" {r.u8():02d}:{r.u8():02d}:{r.u8():02d}"
    if r.remaining >= 4:
        out += f".{r.uint(4, little=True):06d}"
    return out


def _binary_time(raw: bytes) -> str:
    r = Reader(raw)
    if not raw:
        return "00:00:00"
    negative, days = r.u8(), r.uint(4, little=True)
    hours, minutes, seconds = r.u8(), r.u8(), r.u8()
    out = f"{'-' if negative else ''}{days * 24 + hours:02d}:{minutes:02d}:{seconds:02d}"
    if r.remaining >= 4:
        out += f".{r.uint(4, little=True):06d}"
    return out


class MysqlDecoder(Decoder):
    name = "mysql"

    def __init__(self) -> None:
        super().__init__()
        self._phase = "greeting"  # greeting, login, auth, command
        self._capabilities = 0
        self._mariadb_capabilities = 0
        self._statements: dict[int, _Statement] = {}
        self._answer: _Answer | None = None
        self._partial = {d: bytearray() for d in Direction}  # payloads split at 16 MiB

    # -- framing ------------------------------------------------------------

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        head = Reader(buf, pos, streaming=True)
        length, seq = head.uint(3, little=True), head.u8()
        payload = head.take(length)
        if length == 0xFFFFFF:  # the payload continues in the next packet
            self._partial[direction] += payload
            return 4 + length
        payload, self._partial[direction] = bytes(self._partial[direction]) + payload, bytearray()
        if direction is Direction.CLIENT:
            self._client_packet(seq, Reader(payload))
        else:
            self._server_packet(Reader(payload))
        return 4 + length

    # -- client -----------------------------------------------------------------

    def _client_packet(self, seq: int, r: Reader) -> None:
        if self._phase == "login":
            self._parse_handshake_response(r)
        elif self._phase == "auth" or seq != 0:
            self._emit(AuthResponse(direction=Direction.CLIENT, mechanism="auth-data", size=r.remaining))
        else:
            self._parse_command(r)

    def _parse_handshake_response(self, r: Reader) -> None:
        caps = r.uint(4, little=True)
        if not caps & _PROTOCOL_41:
            raise Malformed("pre-4.1 handshake response")
        r.take(4 + 1 + 19)  # max packet, charset, filler
        self._mariadb_capabilities &= r.uint(4, little=True)
        self._capabilities &= caps
        if r.remaining == 0 and caps & _SSL:
            self._emit(ProtocolSwitch(direction=Direction.CLIENT, protocol="tls"))
            self._delegate(TlsDecoder())
            return
        user = r.cstring()
        if caps & _LENENC_AUTH_DATA:
            secret = _lenenc_bytes(r) or b""
        elif caps & _SECURE_CONNECTION:
            secret = r.vec(1)
        else:
            secret = r.until(b"\0")
        database = r.cstring() if caps & _CONNECT_WITH_DB and r.remaining else ""
        params = [("auth_response_bytes", str(len(secret)))]
        if caps & _PLUGIN_AUTH and r.remaining:
            params.append(("auth_plugin", r.cstring()))
        if caps & _CONNECT_ATTRS and r.remaining:
            attrs = r.sub(_lenenc_int(r) or 0)
            while attrs.remaining:
                params.append((_lenenc_str(attrs), _lenenc_str(attrs)))
        self._phase = "auth"
        self._emit(Startup(direction=Direction.CLIENT, user=user, database=database, params=tuple(params)))

    def _parse_command(self, r: Reader) -> None:
        command = r.u8()
        name = _COMMANDS.get(command, f"command 0x{command:02x}")
        self._answer = None if command in _SILENT else _Answer(command)
        if command == 0x03:
            self._emit(Query(direction=Direction.CLIENT, text=text(r.rest())))
        elif command == 0x16:
            self._answer.statement = _Statement(text(r.rest()))
        elif command == 0x17:
            self._parse_execute(r)
        elif command in (0x19, 0x1A, 0x1C):
            statement_id = r.uint(4, little=True)
            if command == 0x19:
                self._statements.pop(statement_id, None)
            self._emit(Message(direction=Direction.CLIENT, name=name, fields=(("statement", str(statement_id)),)))
        elif command in (0x02, 0x04):
            self._emit(Message(direction=Direction.CLIENT, name=name, fields=(("name", text(r.rest()).rstrip("\0")),)))
        else:
            self._emit(Message(direction=Direction.CLIENT, name=name))

    def _parse_execute(self, r: Reader) -> None:
        statement_id = r.uint(4, little=True)
        r.take(5)  # flags, iteration count
        statement = self._statements.get(statement_id)
        assert self._answer is not None
        self._answer.statement = statement
        self._answer.statement_id = statement_id
        if statement is None:
            self._emit(Query(direction=Direction.CLIENT, text=f"<unknown statement {statement_id}>", statement=str(statement_id)))
            return
        params: list[str | None] = []
        if statement.params:
            nulls = r.take((statement.params + 7) // 8)
            if r.u8() == 1:  # new types bound: remembered for later executions
                statement.types = [(r.u8(), bool(r.u8() & 0x80)) for _ in range(statement.params)]
            for index in range(statement.params):
                kind, unsigned = statement.types[index] if index < len(statement.types) else (0xFE, False)
                null = nulls[index // 8] >> (index % 8) & 1
                params.append(None if null else _binary_value(r, _Column("", kind, unsigned)))
        self._emit(Query(direction=Direction.CLIENT, text=statement.text, params=tuple(params), statement=str(statement_id)))

    # -- server -----------------------------------------------------------------

    def _server_packet(self, r: Reader) -> None:
        if self._phase == "greeting":
            self._parse_greeting(r)
        elif self._phase in ("login", "auth"):
            self._parse_auth_reply(r)
        elif self._answer is None:
            self._parse_unsolicited(r)
        else:
            self._parse_answer(self._answer, r)

    def _parse_greeting(self, r: Reader) -> None:
        if r.peek() == 0xFF:
            self._parse_err(r)
            return
        protocol = r.u8()
        if protocol != 10:
            raise Malformed(f"handshake protocol {protocol}")
        version, connection_id = r.cstring(), r.uint(4, little=True)
        r.take(8 + 1)  # auth data part 1, filler
        caps = r.uint(2, little=True)
        plugin = ""
        if r.remaining:
            r.take(1 + 2)  # charset, status
            caps |= r.uint(2, little=True) << 16
            data_len = r.u8()
            r.take(6)
            if not caps & 1:  # no CLIENT_MYSQL bit: a MariaDB server, extended caps follow
                self._mariadb_capabilities = r.uint(4, little=True)
            else:
                r.take(4)
            if caps & _SECURE_CONNECTION:
                r.take(max(13, data_len - 8))
            if caps & _PLUGIN_AUTH and r.remaining:
                plugin = text(r.rest()).rstrip("\0")
        self._capabilities = caps
        self._phase = "login"
        self._emit(Greeting(direction=Direction.SERVER, server_version=version, connection_id=connection_id, auth_plugin=plugin))

    def _parse_auth_reply(self, r: Reader) -> None:
        first = r.peek()
        if first == 0x00:
            self._phase = "command"
            self._emit(Authentication(direction=Direction.SERVER, method="ok"))
        elif first == 0xFF:
            self._parse_err(r)
        elif first == 0xFE:
            r.u8()
            self._emit(Authentication(direction=Direction.SERVER, method=f"switch to {r.cstring()}" if r.remaining else "switch"))
        else:
            self._emit(Authentication(direction=Direction.SERVER, method="more data"))

    def _parse_unsolicited(self, r: Reader) -> None:
        if r.peek() == 0xFF:
            self._parse_err(r)
        else:
            self._emit(Message(direction=Direction.SERVER, name="packet", fields=(("hex", r.rest().hex()),)))

    def _parse_answer(self, answer: _Answer, r: Reader) -> None:
        first = r.peek()
        if answer.stage == "first":
            self._parse_first(answer, r, first)
        elif answer.stage in ("columns", "prepare-params", "prepare-columns"):
            self._parse_definition(answer, r, first)
        elif first == 0xFF:
            self._end_rows(answer)
            self._parse_err(r)
        elif first == 0xFE and r.remaining < 0xFFFFFF and (r.remaining < 9 or self._capabilities & _DEPRECATE_EOF):
            self._end_rows(answer, self._parse_status(r))
        else:
            self._parse_row(answer, r)

    def _parse_first(self, answer: _Answer, r: Reader, first: int) -> None:
        if first == 0xFF:
            self._answer = None
            self._parse_err(r)
        elif first == 0x00 and answer.command == 0x16:
            self._parse_prepare_ok(answer, r)
        elif first == 0x00 or (first == 0xFE and r.remaining < 9):
            self._parse_ok(r)
        elif answer.command in (0x03, 0x17, 0x1C):
            answer.expected = _lenenc_int(r) or 0
            answer.stage = "columns"
            if answer.command == 0x17 and self._mariadb_capabilities & _MARIADB_CACHE_METADATA and not r.u8():
                # MariaDB skips the column definitions it sent with the prepare.
                answer.columns = list(answer.statement.columns) if answer.statement else []
                answer.expected = 0  # the EOF that ends definitions still comes
                if self._capabilities & _DEPRECATE_EOF:
                    self._next_definition_stage(answer)
        elif answer.command == 0x04:  # COM_FIELD_LIST: definitions until EOF
            answer.stage, answer.expected = "columns", 1 << 16
            self._parse_definition(answer, r, first)
        else:
            self._answer = None
            self._emit(Message(direction=Direction.SERVER, name="reply", fields=(("text", text(r.rest())),)))

    def _parse_prepare_ok(self, answer: _Answer, r: Reader) -> None:
        r.u8()
        statement_id, columns, params = r.uint(4, little=True), r.uint(2, little=True), r.uint(2, little=True)
        statement = answer.statement or _Statement("")
        statement.params = params
        self._statements[statement_id] = statement
        self._emit(Prepare(direction=Direction.SERVER, statement=str(statement_id), text=statement.text))
        answer.statement_id = statement_id
        answer.stage, answer.expected = "prepare-params", params
        answer.columns = [_Column("", 0, False)] * columns  # only the count, for now
        if not params:
            self._next_definition_stage(answer)

    def _parse_definition(self, answer: _Answer, r: Reader, first: int) -> None:
        if answer.expected == 0 or (first == 0xFE and r.remaining < 9):
            # the EOF after definitions (absent with CLIENT_DEPRECATE_EOF)
            self._next_definition_stage(answer)
            return
        for _ in range(4):  # catalog, schema, table, original table
            _lenenc_bytes(r)
        name = _lenenc_str(r)
        _lenenc_bytes(r)  # original name
        if self._mariadb_capabilities & _MARIADB_EXTENDED_METADATA:
            _lenenc_bytes(r)  # MariaDB's extended type info (json, uuid...)
        r.take(1 + 2 + 4)  # fixed-length marker, charset, column length
        kind, flags = r.u8(), r.uint(2, little=True)
        column = _Column(name, kind, bool(flags & _UNSIGNED_FLAG))
        if answer.stage != "prepare-params":
            answer.columns.append(column)
        answer.expected -= 1
        if answer.expected == 0 and self._capabilities & _DEPRECATE_EOF:
            self._next_definition_stage(answer)

    def _next_definition_stage(self, answer: _Answer) -> None:
        if answer.stage == "prepare-params":
            answer.expected = len(answer.columns)
            answer.columns = []
            answer.stage = "prepare-columns"
            if answer.expected:
                return
        if answer.stage == "prepare-columns":
            if answer.statement is not None:
                answer.statement.columns = answer.columns
            self._answer = None
            return
        answer.stage = "rows"
        answer.expected = -1  # an EOF here would be the one that ends the rows

    def _parse_row(self, answer: _Answer, r: Reader) -> None:
        if answer.command == 0x03:
            values = tuple(None if v is None else text(v) for v in self._text_row(answer, r))
        else:
            values = self._binary_row(answer, r)
        answer.count += 1
        if len(answer.rows) < MAX_ROWS:
            answer.rows.append(values)

    def _text_row(self, answer: _Answer, r: Reader) -> list[bytes | None]:
        return [_lenenc_bytes(r) for _ in answer.columns]

    def _binary_row(self, answer: _Answer, r: Reader) -> tuple[str | None, ...]:
        r.u8()  # packet header 0x00
        nulls = r.take((len(answer.columns) + 7 + 2) // 8)
        values = []
        for index, column in enumerate(answer.columns):
            bit = index + 2  # the binary row's NULL bitmap is offset by 2 bits
            values.append(None if nulls[bit // 8] >> (bit % 8) & 1 else _binary_value(r, column))
        return tuple(values)

    def _end_rows(self, answer: _Answer, status: int = 0) -> None:
        self._emit(
            ResultSet(
                direction=Direction.SERVER,
                columns=tuple(c.name for c in answer.columns),
                rows=tuple(answer.rows),
                row_count=answer.count,
            )
        )
        self._emit(CommandComplete(direction=Direction.SERVER, tag=f"{answer.count} rows in set"))
        # With more results pending (multi-statement, CALL), the next packet starts a new answer.
        self._answer = _Answer(answer.command, statement=answer.statement) if status & _MORE_RESULTS else None

    def _parse_status(self, r: Reader) -> int:
        r.u8()
        if r.remaining < 4:
            return 0
        if r.remaining >= 9 and self._capabilities & _DEPRECATE_EOF:
            _lenenc_int(r), _lenenc_int(r)  # affected rows, last insert id
            return r.uint(2, little=True)
        r.take(2)  # warnings
        return r.uint(2, little=True)

    def _parse_ok(self, r: Reader) -> None:
        r.u8()
        affected, insert_id = _lenenc_int(r) or 0, _lenenc_int(r) or 0
        status = r.uint(2, little=True) if r.remaining >= 2 else 0
        warnings = r.uint(2, little=True) if r.remaining >= 2 else 0
        if not r.remaining:
            info = ""
        elif self._capabilities & _SESSION_TRACK:
            info = _lenenc_str(r)
        else:
            info = text(r.rest())
        tag = f"OK, {affected} rows affected"
        if insert_id:
            tag += f", insert id {insert_id}"
        if warnings:
            tag += f", {warnings} warnings"
        self._emit(CommandComplete(direction=Direction.SERVER, tag=tag + (f" ({info})" if info else "")))
        if not status & _MORE_RESULTS:
            self._answer = None
        elif self._answer is not None:
            self._answer = _Answer(self._answer.command, statement=self._answer.statement)

    def _parse_err(self, r: Reader) -> None:
        r.u8()
        code = r.uint(2, little=True)
        fields: tuple[tuple[str, str], ...] = ()
        if r.remaining and r.peek() == ord("#"):
            r.u8()
            fields = (("sqlstate", text(r.take(5))),)
        self._emit(Error(direction=Direction.SERVER, message=text(r.rest()), code=str(code), fields=fields))
