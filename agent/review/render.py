"""The decoded view: view items as lines for a terminal, or as JSON.

One small function per event type, picked from a table by the event's
class (mitmproxy's content views): an event type with no function of its
own is shown by its fields, and a function that raises falls back to that
too, so a rendering bug costs one line's looks, never the replay.

Every string shown passes through ``text.clean`` (see there for why), so the
lines can go straight to a terminal.
"""

from __future__ import annotations

import base64
import dataclasses
import enum
from collections.abc import Callable
from typing import Any, Iterable, Iterator

from agent.review import attribution
from agent.review.decoders import (
    AuthResponse, Authentication, CommandComplete, DnsMessage, Encrypted, Error, Event, Greeting, HttpRequest,
    HttpResponse, Message, Notice, Opaque, Parameter, Prepare, ProtocolSwitch, Query, Ready, RedisCommand,
    RedisReply, ResultSet, SshBanner, SshKexInit, Startup, TlsCertificate, TlsClientHello, TlsServerHello,
    Undecodable,
)
from agent.review.text import address, clean, indent, printable, stamp
from agent.review.view import Attributed, Closed, Decoded, Detected, HandedOver, Item, Opened, Raw

__all__ = ["TextRenderer", "render_items", "item_json", "action_text", "ARROWS"]

ARROWS = {"c": "->", "s": "<-"}
# Bytes of a body or an undecoded run shown in the terminal (--raw has all).
PREVIEW_BYTES = 4096
CELL_WIDTH = 80
MAX_REPLY_LINES = 200
# Protocol plumbing a reviewer does not need between the statements (--json keeps it).
QUIET_MESSAGES = {
    "Sync", "Flush", "ParseComplete", "BindComplete", "CloseComplete", "NoData", "Bind", "Describe",
    "Close", "ParameterDescription", "ChangeCipherSpec",
}
Lines = list[str]


# -- one function per event type ---------------------------------------------------


def _pairs(pairs: Iterable[tuple[str, str]]) -> str:
    return " ".join(f"{k}={v}" for k, v in pairs)


def _startup(e: Startup) -> Lines:
    extra = f" ({_pairs(e.params)})" if e.params else ""
    return [f"startup user={e.user} database={e.database}{extra}"]


def _query(e: Query) -> Lines:
    head = f"EXECUTE {e.statement}: " if e.statement is not None else "QUERY "
    lines = (head + e.text).split("\n")
    if e.params:
        shown = ", ".join(f"${i}={'NULL' if p is None else repr(p)}" for i, p in enumerate(e.params, 1))
        lines.append(f"  params: {shown}")
    return lines


def _prepare(e: Prepare) -> Lines:
    return f"PREPARE {e.statement}: {e.text}".split("\n")


def _cell(value: str | None) -> str:
    out = "NULL" if value is None else clean(value, newlines=False)
    return out if len(out) <= CELL_WIDTH else out[: CELL_WIDTH - 3] + "..."


def table(columns: tuple[str, ...], rows: Iterable[tuple[str | None, ...]]) -> Lines:
    """An aligned text table, psql style."""
    head = [_cell(c) for c in columns]
    body = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(head[i])] + [len(r[i]) for r in body if i < len(r)]) for i in range(len(head))]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
    return [fmt(head), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in body]


def _result(e: ResultSet) -> Lines:
    more = f", {len(e.rows)} decoded" if e.row_count > len(e.rows) else ""
    noun = "row" if e.row_count == 1 else "rows"
    return table(e.columns, e.rows) + [f"({e.row_count} {noun}{more})"]


def _error(e: Error | Notice) -> Lines:
    kind = "ERROR" if isinstance(e, Error) else "NOTICE"
    code = f" {e.code}" if e.code else ""
    details = [f"  {k}: {v}" for k, v in e.fields if k in ("detail", "hint", "sqlstate", "position")]
    return [f"{kind}{code}: {e.message}", *details]


def _http_body(body: bytes, size: int) -> Lines:
    if not size:
        return []
    lines = [f"  [{size} body bytes]"] + indent(printable(body[:PREVIEW_BYTES]), "  | ")
    if size > PREVIEW_BYTES:
        lines.append(f"  ... ({size - PREVIEW_BYTES} more body bytes)")
    return lines


def _http_request(e: HttpRequest) -> Lines:
    return ([f"{e.method} {e.target} {e.version}"] + [f"  {k}: {v}" for k, v in e.headers]
            + _http_body(e.body, e.body_size))


def _http_response(e: HttpResponse) -> Lines:
    return ([f"{e.version} {e.status} {e.reason}"] + [f"  {k}: {v}" for k, v in e.headers]
            + _http_body(e.body, e.body_size))


def _redis_arg(a: str) -> str:
    return a if a and not any(c.isspace() or c in "\"'" for c in a) else repr(a)


def redis_value(value: Any) -> Lines:
    """A RESP value the way redis-cli prints it."""
    if value is None:
        return ["(nil)"]
    if isinstance(value, bool):
        return [f"(boolean) {str(value).lower()}"]
    if isinstance(value, int):
        return [f"(integer) {value}"]
    if isinstance(value, str):
        # the decoder marks nested errors with a str subclass
        return [f"(error) {value}" if type(value) is not str else repr(value)]
    if not value:
        return ["(empty array)"]
    lines = []
    for i, v in enumerate(value, 1):
        sub = redis_value(v)
        lines.append(f"{i}) {sub[0]}")
        lines += ["   " + line for line in sub[1:]]
        if len(lines) > MAX_REPLY_LINES:  # e.g. COMMAND DOCS: thousands of lines of no interest
            return lines[:MAX_REPLY_LINES] + [f"... ({len(value) - i} more elements; --json has all)"]
    return lines


def _kex(e: SshKexInit) -> Lines:
    show = lambda names: ",".join(names[:3]) + (",..." if len(names) > 3 else "")
    return [f"SSH KEXINIT kex={show(e.kex)} host_key={show(e.host_key)} ciphers={show(e.ciphers)} "
            f"macs={show(e.macs)}"]


def _dns(e: DnsMessage) -> Lines:
    qs = ", ".join(f"{q.name} {q.type}" for q in e.questions)
    if not e.is_response:
        return [f"DNS query #{e.id}: {qs}"]
    lines = [f"DNS answer #{e.id} {e.rcode}: {qs}"]
    lines += [f"  {a.name} {a.ttl} {a.type} {a.data}" for a in e.answers]
    return lines


def _message(e: Message) -> Lines:
    return [f"{e.name} {_pairs(e.fields)}".rstrip()]


def _opaque(e: Opaque) -> Lines:
    return [f"{e.size} bytes not decoded:"] + indent(printable(e.data, PREVIEW_BYTES))


_EVENTS: dict[type, Callable[[Any], Lines]] = {
    Startup: _startup,
    Authentication: lambda e: [f"authentication: {e.method}"],
    AuthResponse: lambda e: [f"authentication response: {e.mechanism} ({e.size} bytes, not shown)"],
    Query: _query,
    Prepare: _prepare,
    ResultSet: _result,
    CommandComplete: lambda e: [f"done: {e.tag}"],
    Error: _error,
    Notice: _error,
    Greeting: lambda e: [f"server {e.server_version}, connection {e.connection_id}, auth {e.auth_plugin}"],
    HttpRequest: _http_request,
    HttpResponse: _http_response,
    RedisCommand: lambda e: [" ".join(_redis_arg(a) for a in e.args)],
    RedisReply: lambda e: redis_value(e.value),
    TlsClientHello: lambda e: [f"TLS ClientHello SNI={e.sni or '-'} ALPN={','.join(e.alpn) or '-'} "
                               f"versions={','.join(e.versions)}"],
    TlsServerHello: lambda e: [f"TLS ServerHello {e.version} {e.cipher} ALPN={e.alpn or '-'}"],
    TlsCertificate: lambda e: [f"TLS certificate subject={e.subject} issuer={e.issuer}"],
    SshBanner: lambda e: [f"SSH banner {e.text}"],
    SshKexInit: _kex,
    DnsMessage: _dns,
    Message: _message,
    ProtocolSwitch: lambda e: [f"switches to {e.protocol}"],
    Opaque: _opaque,
    Encrypted: lambda e: [f"[{e.byte_count} encrypted bytes]"],
    Undecodable: lambda e: [f"not decodable from byte {e.offset}: {e.reason}; shown as recorded below"],
}


def event_lines(event: Event) -> Lines:
    """Lines for one event; its fields when its function is missing or fails."""
    show = _EVENTS.get(type(event))
    try:
        if show is not None:
            return show(event)
    except Exception:  # a rendering bug must not stop the replay (see module doc)
        pass
    fields = ", ".join(f"{f.name}={getattr(event, f.name)!r}" for f in dataclasses.fields(event)
                       if f.name != "direction")
    return [f"{type(event).__name__} {fields}"]


def _quiet(event: Event) -> bool:
    return isinstance(event, Ready) or (isinstance(event, Message) and event.name in QUIET_MESSAGES)


# -- items -------------------------------------------------------------------------


class TextRenderer:
    """Items in, terminal lines out. Runs of server parameters are folded
    into one line, so it keeps that run until the next item."""

    def __init__(self) -> None:
        self._params: list[tuple[int, Parameter]] = []

    def lines(self, item: Item) -> Lines:
        if isinstance(item, Decoded) and isinstance(item.event, Parameter):
            self._params.append((item.ts_ns, item.event))
            return []
        return self.flush() + self._item(item)

    def flush(self) -> Lines:
        if not self._params:
            return []
        ts, first = self._params[0]
        shown = ", ".join(f"{p.name}={p.value}" for _, p in self._params)
        self._params = []
        return _stamped(ts, first.direction.value, [f"parameters: {shown}"])

    def _item(self, item: Item) -> Lines:
        if isinstance(item, Decoded):
            return [] if _quiet(item.event) else _stamped(item.ts_ns, item.event.direction.value,
                                                          event_lines(item.event))
        if isinstance(item, Raw):
            head = f"{len(item.data)} bytes (as recorded, from byte {item.offset}):"
            return _stamped(item.ts_ns, item.direction.value, [head, *indent(printable(item.data, PREVIEW_BYTES))])
        if isinstance(item, Opened):
            return _stamped(item.ts_ns, " ", [
                f"session {item.session}: {address(item.client)} -> {address(item.original_dst)}"
                + (f" ({item.protocol})" if item.protocol else "")])
        if isinstance(item, Attributed):
            return _attributed(item)
        if isinstance(item, Detected):
            return _stamped(item.ts_ns, " ", [f"protocol: {item.protocol}"])
        if isinstance(item, HandedOver):
            line = _HANDED.get(item.what, item.what)
            if any(item.pending):
                line += (f" ({item.pending[0]} bytes to the server and {item.pending[1]} to the "
                         "client, recorded before the stop, are sent after it)")
            return _stamped(item.ts_ns, " ", [line])
        if isinstance(item, Closed):
            c = item.close
            return _stamped(item.ts_ns, " ", [f"close ({c.get('reason')}): {c.get('client_bytes')} bytes "
                                              f"sent, {c.get('server_bytes')} bytes received"])
        return []


_HANDED = {"sessions_handed_over": "agent stopping (a restart): the session is handed to the next run",
           "sessions_resumed": "agent started: the session goes on through this run"}


def _attributed(item: Attributed) -> Lines:
    info = item.info
    chain = attribution.session_chain(info)
    if not chain:
        return _stamped(item.ts_ns, " ", [f"process: not attributed ({info.get('error', 'no chain')})"])
    head = [f"subject uid {info.get('uid', '?')}; process chain, login first:"]
    own = info.get("client_before_nat")
    if own:   # the session's client port is conntrack's, not the socket's
        head.insert(0, f"client socket {own[0]}:{own[1]} (conntrack changed its port on the way)")
    return _stamped(item.ts_ns, " ", head + ["  " + line for line in attribution.detail_lines(chain)])


def _stamped(ts_ns: int, direction: str, lines: Lines) -> Lines:
    """The first line gets the time and arrow, the rest align under it; every
    line is cleaned here, the one place lines are made for a terminal."""
    arrow = ARROWS.get(direction, "  ")
    lead, pad = f"{stamp(ts_ns)} {arrow} ", " " * 28
    return [(lead if i == 0 else pad) + clean(line, newlines=False) for i, line in enumerate(lines)]


def render_items(items: Iterable[Item]) -> Iterator[str]:
    """The decoded view: every item's lines, in order."""
    r = TextRenderer()
    for item in items:
        yield from r.lines(item)
    yield from r.flush()


# -- JSON --------------------------------------------------------------------------


def _plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, enum.Enum):
        return {"c": "client", "s": "server"}.get(value.value, value.value)
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (bytes, bytearray)):
        try:
            return bytes(value).decode("utf-8")
        except UnicodeDecodeError:
            return {"base64": base64.b64encode(value).decode()}
    return value


def item_json(item: Item) -> dict:
    """One item as a JSON-ready dict: type, time, and its fields."""
    out: dict[str, Any] = {"type": type(item).__name__.lower(), "time_ns": item.ts_ns, "time": stamp(item.ts_ns)}
    for f in dataclasses.fields(item):
        if f.name == "ts_ns":
            continue
        value = getattr(item, f.name)
        if f.name == "event":
            out["event"] = {"type": type(value).__name__, **_plain(value)}
        else:
            out[f.name] = _plain(value)
    return out


# -- what the client did, for search and the report --------------------------------

_ACTIONS: dict[type, Callable[[Any], str]] = {
    Query: lambda e: e.text,
    HttpRequest: lambda e: f"{e.method} {e.target} " + " ".join(v for k, v in e.headers if k.lower() == "host"),
    RedisCommand: lambda e: " ".join(e.args),
    TlsClientHello: lambda e: f"TLS {e.sni or '(no SNI)'}",
    SshBanner: lambda e: e.text,
    DnsMessage: lambda e: " ".join(f"{q.name} {q.type}" for q in e.questions),
    Startup: lambda e: f"login {e.user}@{e.database}",
}


def action_text(event: Event) -> str | None:
    """What the subject asked for in one event (a statement, a request, a
    command, a host name), or None when the event is not the subject's ask."""
    if event.direction.value != "c":
        return None
    show = _ACTIONS.get(type(event))
    return show(event) if show is not None else None
