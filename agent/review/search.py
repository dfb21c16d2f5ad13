"""Finding sessions: by subject, destination, protocol, time, and by text in
what the subject asked for (decoded queries, requests, commands).

The first four look at the session summaries; ``grep`` has to decode, so it
runs last, over the sessions the others left, in one more pass of the store.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Iterable

from agent.review.render import action_text
from agent.review.sessions import SessionSummary, list_sessions, session_of
from agent.review.view import Decoded, SessionView
from agent.store import Kind, Record, iter_records

__all__ = ["SessionFilter", "Destination", "Digest", "parse_time", "parse_destination", "search_sessions",
           "DigestFold", "digest_sessions"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_RELATIVE = re.compile(r"(\d+(?:\.\d+)?)([smhdw])")


def parse_time(text: str, now_ns: int | None = None) -> int:
    """ISO 8601 (UTC unless it says otherwise) or a time ago: ``10m``, ``2h``, ``1d``.
    Nanoseconds since the epoch; ValueError on anything else."""
    text = text.strip()
    m = _RELATIVE.fullmatch(text)
    if m:
        now = time.time_ns() if now_ns is None else now_ns
        return now - int(float(m.group(1)) * _UNITS[m.group(2)] * 1e9)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r} is neither an ISO time nor a time ago like 10m, 2h, 1d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.timezone.utc)  # the views print UTC, so a bare time means UTC
    return int(when.timestamp() * 1e9)


@dataclass(frozen=True, slots=True)
class Destination:
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None
    port: int | None

    def matches(self, addr: tuple[str, int]) -> bool:
        if self.port is not None and addr[1] != self.port:
            return False
        if self.network is None:
            return True
        try:
            return ipaddress.ip_address(addr[0]) in self.network
        except ValueError:
            return False


def parse_destination(text: str) -> Destination:
    """``ip``, ``ip:port``, ``[v6]:port``, ``CIDR``, ``CIDR:port`` (v4) or ``:port``."""
    host, port = text.strip(), None
    if host.startswith("["):
        host, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else None
    elif host.count(":") == 1:
        host, port = host.split(":")
    try:
        network = ipaddress.ip_network(host, strict=False) if host else None
        port_no = int(port) if port else None
    except ValueError:
        raise ValueError(f"{text!r}: want ip, ip:port, [ipv6]:port, CIDR or :port") from None
    if port_no is not None and not 0 < port_no < 65536:
        raise ValueError(f"{text!r}: port out of range")
    return Destination(network, port_no)


@dataclass(frozen=True, slots=True)
class SessionFilter:
    subject: str | None = None  # user name or uid
    dst: Destination | None = None
    protocol: str | None = None
    since_ns: int | None = None  # sessions open at any time in [since, until]
    until_ns: int | None = None
    grep: str | None = None  # text in what the subject asked for, case-insensitive

    def matches(self, s: SessionSummary) -> bool:
        """Everything but ``grep``."""
        checks: list[Callable[[], bool]] = [
            lambda: self.subject is None or self.subject in (s.subject, str(s.info.get("uid"))),
            lambda: self.dst is None or self.dst.matches(s.original_dst),
            lambda: self.protocol is None or self.protocol in (s.protocol, s.protocol.split("-")[0]),
            lambda: self.since_ns is None or (s.end_ns or time.time_ns()) >= self.since_ns,
            lambda: self.until_ns is None or s.start_ns <= self.until_ns,
        ]
        return all(check() for check in checks)


@dataclass(slots=True)
class Digest:
    """What one session's subject asked for: the first few asks, how many, a match."""

    protocol: str = "-"
    actions: list[str] = field(default_factory=list)
    action_count: int = 0
    matched: bool = False


class DigestFold:
    """Decodes sessions as their records come: the given ones, or (ids None)
    every session from its SESSION_OPEN on. A session's decoder is let go
    at its close, so memory follows the sessions open at once."""

    def __init__(self, ids: Iterable[int] | None = None, keep: int = 5, needle: str | None = None) -> None:
        self._every = ids is None
        self._views = {sid: SessionView() for sid in ids or ()}
        self.digests = {sid: Digest() for sid in self._views}
        self._keep, self._needle = keep, needle.casefold() if needle else None

    @property
    def done(self) -> bool:
        """Every given session closed: nothing later is theirs."""
        return not self._every and not self._views

    def add(self, r: Record) -> None:
        sid = session_of(r)
        view = self._views.get(sid)
        if view is None:
            if not (self._every and r.kind == Kind.SESSION_OPEN):
                return
            view = self._views[sid] = SessionView()
            self.digests[sid] = Digest()
        _digest(self.digests[sid], view.add(r), self._keep, self._needle)
        if r.kind == Kind.SESSION_CLOSE:
            self._let_go(sid)

    def result(self) -> dict[int, Digest]:
        for sid in list(self._views):
            self._let_go(sid)
        return self.digests

    def _let_go(self, sid: int) -> None:
        view, digest = self._views.pop(sid), self.digests[sid]
        _digest(digest, view.finish(0), self._keep, self._needle)
        digest.protocol = view.protocol or digest.protocol


def digest_sessions(store_dir: str, ids: Iterable[int], keep: int = 5,
                    needle: str | None = None) -> dict[int, Digest]:
    """Decode the given sessions in one pass of the store, from the first of them."""
    wanted = set(ids)
    f = DigestFold(wanted, keep, needle)
    for r in iter_records(store_dir, strict=False, start_seq=min(wanted, default=0)):
        if f.done:
            break
        f.add(r)
    return f.result()


def _digest(d: Digest, items: list, keep: int, needle: str | None) -> None:
    for item in items:
        if not isinstance(item, Decoded):
            continue
        text = action_text(item.event)
        if text is None:
            continue
        d.action_count += 1
        if len(d.actions) < keep:
            d.actions.append(text)
        if needle and needle in text.casefold():
            d.matched = True


def search_sessions(store_dir: str, f: SessionFilter) -> list[SessionSummary]:
    found = [s for s in list_sessions(store_dir) if f.matches(s)]
    if not f.grep or not found:
        return found
    digests = digest_sessions(store_dir, [s.id for s in found], keep=0, needle=f.grep)
    return [s for s in found if digests[s.id].matched]
