"""PostgreSQL frontend/backend protocol v3.

Messages that may come at any time (notices, parameter status) need no
state; the rest dispatch on (phase, message type) to small ``_parse_*``
methods. The client's first messages carry no type byte (startup phase);
an SSLRequest or GSSENCRequest is answered by one untyped byte, and after an
'S' the session is TLS (handed to the TLS decoder), after a 'G' it is
GSSAPI-encrypted.

Extended protocol: Parse remembers statement text by name, Bind remembers the
portal's statement and decoded parameters, Execute emits one ``Query`` —
so every executed statement is one ``Query`` event, simple or prepared.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .base import (
    MAX_ROWS, Authentication, AuthResponse, CommandComplete, Decoder, Direction, Error, Malformed, Message,
    Mode, Notice, Parameter, Prepare, ProtocolSwitch, Query, Reader, Ready, ResultSet, Startup, text,
)
from .tls import TlsDecoder

__all__ = ["PostgresDecoder"]

_SSL_REQUEST = 80877103
_GSSENC_REQUEST = 80877104
_CANCEL_REQUEST = 80877102
_PROTOCOL_3 = 196608
_MAX_MESSAGE = 1 << 30

_AUTH_METHODS = {
    0: "ok", 2: "kerberos-v5", 3: "cleartext-password", 5: "md5-password", 7: "gss", 8: "gss-continue",
    9: "sspi", 10: "sasl", 11: "sasl-continue", 12: "sasl-final",
}
# Error/notice field codes (protocol "Error and Notice Message Fields").
_FIELD_NAMES = {
    "S": "severity", "V": "severity_nonlocalized", "C": "code", "M": "message", "D": "detail", "H": "hint", "P": "position",
    "p": "internal_position", "q": "internal_query", "W": "where", "s": "schema", "t": "table", "c": "column",
    "d": "data_type", "n": "constraint", "F": "file", "L": "line", "R": "routine",
}
# Messages with no content worth more than their name.
_CLIENT_BARE = {b"S": "Sync", b"H": "Flush", b"X": "Terminate", b"c": "CopyDone"}
_SERVER_BARE = {
    b"1": "ParseComplete", b"2": "BindComplete", b"3": "CloseComplete", b"n": "NoData",
    b"I": "EmptyQueryResponse", b"s": "PortalSuspended", b"c": "CopyDone",
}


@dataclass(slots=True)
class _Rows:
    """RowDescription + DataRows waiting for the CommandComplete that ends them."""

    columns: tuple[str, ...] = ()
    binary: tuple[bool, ...] = ()
    rows: list[tuple[str | None, ...]] = field(default_factory=list)
    count: int = 0


def _value(data: bytes | None, binary: bool) -> str | None:
    if data is None:
        return None
    return "\\x" + data.hex() if binary else text(data)


class PostgresDecoder(Decoder):
    name = "postgres"

    def __init__(self) -> None:
        super().__init__()
        self._startup_phase = True  # client messages have no type byte yet
        self._awaiting_reply: str | None = None  # "ssl"/"gssenc": server answers one byte
        self._auth_method = 0
        self._statements: dict[str, str] = {}
        self._portals: dict[str, tuple[str, tuple[str | None, ...]]] = {}
        self._rows: _Rows | None = None
        self._client: dict[bytes, Callable[[Reader], None]] = {
            b"Q": self._parse_query, b"P": self._parse_parse, b"B": self._parse_bind,
            b"E": self._parse_execute, b"D": self._parse_describe, b"C": self._parse_close,
            b"p": self._parse_password, b"d": lambda r: self._parse_copy_data(Direction.CLIENT, r), b"f": self._parse_copy_fail,
            b"F": self._parse_function_call,
        }
        self._server: dict[bytes, Callable[[Reader], None]] = {
            b"R": self._parse_authentication, b"S": self._parse_parameter_status,
            b"K": self._parse_backend_key, b"Z": self._parse_ready, b"T": self._parse_row_description,
            b"D": self._parse_data_row, b"C": self._parse_command_complete, b"E": self._parse_error,
            b"N": self._parse_notice, b"d": lambda r: self._parse_copy_data(Direction.SERVER, r), b"G": self._parse_copy_response,
            b"H": self._parse_copy_response, b"W": self._parse_copy_response, b"A": self._parse_notification,
            b"t": self._parse_parameter_description, b"V": self._parse_function_result,
            b"v": self._parse_negotiate_version,
        }

    # -- framing ------------------------------------------------------------

    def _step(self, direction: Direction, buf: bytearray, pos: int) -> int:
        if direction is Direction.SERVER and self._awaiting_reply and buf[pos : pos + 1] in (b"S", b"G", b"N"):
            return self._parse_encryption_reply(bytes(buf[pos : pos + 1]))
        if direction is Direction.SERVER:
            self._awaiting_reply = None  # e.g. an old server's ErrorResponse instead of 'N'
        if direction is Direction.CLIENT and self._startup_phase:
            return self._frame(buf, pos, 0, self._parse_startup_message)
        kind = bytes(buf[pos : pos + 1])
        table = self._client if direction is Direction.CLIENT else self._server
        bare = _CLIENT_BARE if direction is Direction.CLIENT else _SERVER_BARE
        parse = table.get(kind) or (lambda r, k=kind, d=direction: self._parse_bare(d, bare, k, r))
        return self._frame(buf, pos, 1, parse)

    def _frame(self, buf: bytearray, pos: int, type_bytes: int, parse: Callable[[Reader], None]) -> int:
        """Frame one length-prefixed message; parse it once it is all here."""
        head = Reader(buf, pos + type_bytes, streaming=True)
        length = head.u32()
        if not 4 <= length <= _MAX_MESSAGE:
            raise Malformed(f"message length {length}")
        end = pos + type_bytes + length
        if end > len(buf):
            return 0
        parse(Reader(buf, head.pos, end))
        return end - pos

    # -- startup phase ---------------------------------------------------------

    def _parse_startup_message(self, r: Reader) -> None:
        code = r.u32()
        if code == _SSL_REQUEST or code == _GSSENC_REQUEST:
            self._awaiting_reply = "ssl" if code == _SSL_REQUEST else "gssenc"
            self._emit(Message(direction=Direction.CLIENT, name="SSLRequest" if code == _SSL_REQUEST else "GSSENCRequest"))
        elif code == _CANCEL_REQUEST:
            pid, _key = r.u32(), r.u32()
            self._emit(Message(direction=Direction.CLIENT, name="CancelRequest", fields=(("pid", str(pid)),)))
        elif code >> 16 == 3:
            self._parse_startup_params(r)
        else:
            raise Malformed(f"unknown startup code {code}")

    def _parse_startup_params(self, r: Reader) -> None:
        params: list[tuple[str, str]] = []
        while r.remaining > 1:
            params.append((r.cstring(), r.cstring()))
        found = dict(params)
        self._startup_phase = False
        user = found.get("user", "")
        self._emit(
            Startup(
                direction=Direction.CLIENT,
                user=user,
                database=found.get("database", user),
                params=tuple(p for p in params if p[0] not in ("user", "database")),
            )
        )

    def _parse_encryption_reply(self, reply: bytes) -> int:
        kind, self._awaiting_reply = self._awaiting_reply or "", None
        if reply == b"S" and kind == "ssl":
            self._emit(ProtocolSwitch(direction=Direction.SERVER, protocol="tls"))
            self._delegate(TlsDecoder())
        elif reply == b"G" and kind == "gssenc":
            self._emit(ProtocolSwitch(direction=Direction.SERVER, protocol="gssapi"))
            for direction in Direction:
                self._set_mode(direction, Mode.ENCRYPTED)
        elif reply == b"N":
            self._emit(Message(direction=Direction.SERVER, name=f"{kind.upper()}Refused"))
        else:
            raise Malformed(f"reply {reply!r} to a {kind} request")
        return 1

    # -- client messages ---------------------------------------------------------

    def _parse_query(self, r: Reader) -> None:
        self._emit(Query(direction=Direction.CLIENT, text=r.cstring()))

    def _parse_parse(self, r: Reader) -> None:
        name, sql = r.cstring(), r.cstring()
        self._statements[name] = sql
        self._emit(Prepare(direction=Direction.CLIENT, statement=name, text=sql))

    def _parse_bind(self, r: Reader) -> None:
        portal, statement = r.cstring(), r.cstring()
        formats = [r.u16() for _ in range(r.u16())]
        params = []
        for index in range(r.u16()):
            size = r.i32()
            raw = None if size < 0 else r.take(size)
            fmt = formats[0] if len(formats) == 1 else formats[index] if formats else 0
            params.append(_value(raw, fmt == 1))
        self._portals[portal] = (statement, tuple(params))
        self._emit(Message(direction=Direction.CLIENT, name="Bind", fields=(("portal", portal), ("statement", statement))))

    def _parse_execute(self, r: Reader) -> None:
        portal = r.cstring()
        statement, params = self._portals.get(portal, ("", ()))
        sql = self._statements.get(statement, f"<unknown statement {statement!r}>")
        self._emit(Query(direction=Direction.CLIENT, text=sql, params=params, statement=statement))

    def _parse_describe(self, r: Reader) -> None:
        kind, name = r.take(1), r.cstring()
        what = "portal" if kind == b"P" else "statement"
        self._emit(Message(direction=Direction.CLIENT, name="Describe", fields=((what, name),)))

    def _parse_close(self, r: Reader) -> None:
        kind, name = r.take(1), r.cstring()
        if kind == b"S":
            self._statements.pop(name, None)
        self._emit(Message(direction=Direction.CLIENT, name="Close", fields=(("portal" if kind == b"P" else "statement", name),)))

    def _parse_password(self, r: Reader) -> None:
        # The meaning of 'p' depends on what the server asked for; secrets are not shown.
        if self._auth_method == 10:
            mechanism = r.cstring()
            self._emit(AuthResponse(direction=Direction.CLIENT, mechanism=mechanism, size=r.remaining))
            return
        names = {3: "password", 5: "md5", 11: "sasl", 7: "gss", 8: "gss", 9: "sspi"}
        self._emit(AuthResponse(direction=Direction.CLIENT, mechanism=names.get(self._auth_method, "password"), size=r.remaining))

    def _parse_copy_fail(self, r: Reader) -> None:
        self._emit(Error(direction=Direction.CLIENT, message=r.cstring(), code="CopyFail"))

    def _parse_function_call(self, r: Reader) -> None:
        self._emit(Message(direction=Direction.CLIENT, name="FunctionCall", fields=(("oid", str(r.u32())),)))

    # -- server messages ---------------------------------------------------------

    def _parse_authentication(self, r: Reader) -> None:
        code = r.u32()
        self._auth_method = code  # tells what the client's next 'p' message is
        method = _AUTH_METHODS.get(code, f"code {code}")
        if code == 10:
            mechanisms = []
            while r.remaining > 1:
                mechanisms.append(r.cstring())
            method += " " + ",".join(mechanisms)
        self._emit(Authentication(direction=Direction.SERVER, method=method))

    def _parse_parameter_status(self, r: Reader) -> None:
        self._emit(Parameter(direction=Direction.SERVER, name=r.cstring(), value=r.cstring()))

    def _parse_backend_key(self, r: Reader) -> None:
        self._emit(Message(direction=Direction.SERVER, name="BackendKeyData", fields=(("pid", str(r.u32())),)))

    def _parse_ready(self, r: Reader) -> None:
        self._rows = None  # a Describe without Execute leaves columns behind
        status = {b"I": "idle", b"T": "transaction", b"E": "failed transaction"}.get(r.take(1), "?")
        self._emit(Ready(direction=Direction.SERVER, status=status))

    def _parse_row_description(self, r: Reader) -> None:
        names, binary = [], []
        for _ in range(r.u16()):
            names.append(r.cstring())
            r.take(16)  # table oid, column number, type oid, type size, type modifier
            binary.append(r.u16() == 1)
        self._rows = _Rows(columns=tuple(names), binary=tuple(binary))

    def _parse_data_row(self, r: Reader) -> None:
        rows = self._rows
        count = r.u16()
        if rows is None or len(rows.columns) != count:
            rows = self._rows = _Rows(columns=tuple(f"column{i + 1}" for i in range(count)), binary=(False,) * count)
        values = []
        for index in range(count):
            size = r.i32()
            values.append(_value(None if size < 0 else r.take(size), rows.binary[index]))
        rows.count += 1
        if len(rows.rows) < MAX_ROWS:
            rows.rows.append(tuple(values))

    def _flush_rows(self) -> None:
        rows, self._rows = self._rows, None
        if rows is not None:
            self._emit(ResultSet(direction=Direction.SERVER, columns=rows.columns, rows=tuple(rows.rows), row_count=rows.count))

    def _parse_command_complete(self, r: Reader) -> None:
        self._flush_rows()
        self._emit(CommandComplete(direction=Direction.SERVER, tag=r.cstring()))

    def _fields(self, r: Reader) -> tuple[tuple[str, str], ...]:
        fields = []
        while r.remaining > 1:
            code = text(r.take(1))
            fields.append((_FIELD_NAMES.get(code, code), r.cstring()))
        return tuple(fields)

    def _parse_error(self, r: Reader) -> None:
        self._flush_rows()
        fields = self._fields(r)
        found = dict(fields)
        self._emit(Error(direction=Direction.SERVER, message=found.get("message", ""), code=found.get("code", ""), fields=fields))

    def _parse_notice(self, r: Reader) -> None:
        fields = self._fields(r)
        found = dict(fields)
        self._emit(Notice(direction=Direction.SERVER, message=found.get("message", ""), code=found.get("code", ""), fields=fields))

    def _parse_copy_response(self, r: Reader) -> None:
        binary = r.u8() == 1
        columns = r.u16()
        self._emit(Message(direction=Direction.SERVER, name="CopyResponse", fields=(("format", "binary" if binary else "text"), ("columns", str(columns)))))

    def _parse_notification(self, r: Reader) -> None:
        pid, channel, payload = r.u32(), r.cstring(), r.cstring()
        self._emit(Message(direction=Direction.SERVER, name="Notification", fields=(("pid", str(pid)), ("channel", channel), ("payload", payload))))

    def _parse_parameter_description(self, r: Reader) -> None:
        oids = [str(r.u32()) for _ in range(r.u16())]
        self._emit(Message(direction=Direction.SERVER, name="ParameterDescription", fields=(("type_oids", ",".join(oids)),)))

    def _parse_function_result(self, r: Reader) -> None:
        size = r.i32()
        self._emit(Message(direction=Direction.SERVER, name="FunctionCallResponse", fields=(("value", str(_value(None if size < 0 else r.take(size), True))),)))

    def _parse_negotiate_version(self, r: Reader) -> None:
        self._emit(Message(direction=Direction.SERVER, name="NegotiateProtocolVersion", fields=(("minor", str(r.u32())),)))

    # -- either direction -------------------------------------------------------

    def _parse_copy_data(self, direction: Direction, r: Reader) -> None:
        self._emit(Message(direction=direction, name="CopyData", fields=(("data", text(r.rest())),)))

    def _parse_bare(self, direction: Direction, names: dict[bytes, str], kind: bytes, r: Reader) -> None:
        name = names.get(kind)
        if name is None:
            raise Malformed(f"unknown message type {kind!r}")
        if name == "PortalSuspended":
            self._flush_rows()
        self._emit(Message(direction=direction, name=name))
