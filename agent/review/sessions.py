"""Session and alert summaries folded from the store's records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Iterator

from agent.store import Kind, Record, iter_records


@dataclass(slots=True)
class SessionSummary:
    id: int
    start_ns: int
    client: tuple[str, int]
    original_dst: tuple[str, int]
    info: dict = field(default_factory=dict)
    end_ns: int | None = None
    close: dict | None = None
    bytes: list[int] = field(default_factory=lambda: [0, 0])  # client->server, server->client

    @property
    def state(self) -> str:
        if self.close is None:
            return "open"
        reason = self.close.get("reason", "")
        return "closed" if reason == "closed" else reason

    @property
    def process(self) -> str:
        chain = self.info.get("chain") or []
        if not chain:
            return self.info.get("error", "?")
        p = chain[0]
        return " ".join(p.get("argv") or [p.get("comm") or "?"])[:60]

    @property
    def subject(self) -> str:
        chain = self.info.get("chain") or []
        if chain and chain[0].get("user"):
            return chain[0]["user"]
        return str(self.info.get("uid", "?"))

    def as_dict(self) -> dict:
        return {"id": self.id, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "client": list(self.client), "original_dst": list(self.original_dst),
                "subject": self.subject, "process": self.process,
                "client_bytes": self.bytes[0], "server_bytes": self.bytes[1],
                "state": self.state, "attribution": self.info, "close": self.close}


def fold_sessions(records: Iterable[Record]) -> dict[int, SessionSummary]:
    sessions: dict[int, SessionSummary] = {}
    for r in records:
        if r.kind == Kind.DATA:
            sid, d, data = r.data()
            s = sessions.get(sid)
            if s is not None:
                s.bytes[d] += len(data)
        elif r.kind == Kind.SESSION_OPEN:
            j = r.json()
            sessions[r.seq] = SessionSummary(r.seq, r.ts_ns, tuple(j["client"]),
                                             tuple(j["original_dst"]))
        elif r.kind in (Kind.SESSION_INFO, Kind.SESSION_CLOSE):
            j = r.json()
            s = sessions.get(j.get("session"))
            if s is None:
                continue
            if r.kind == Kind.SESSION_INFO:
                s.info = j
            else:
                s.close, s.end_ns = j, r.ts_ns
    return sessions


def list_sessions(store_dir: str) -> list[SessionSummary]:
    return sorted(fold_sessions(iter_records(store_dir, strict=False)).values(),
                  key=lambda s: s.id)


def session_records(store_dir: str, session_id: int) -> Iterator[Record]:
    """The records of one session, in store order."""
    for r in iter_records(store_dir, strict=False):
        if r.seq < session_id:
            continue
        if r.kind == Kind.DATA:
            if r.data()[0] == session_id:
                yield r
        elif r.kind in (Kind.SESSION_OPEN, Kind.SESSION_INFO, Kind.SESSION_CLOSE):
            j = r.json()
            if r.seq == session_id or j.get("session") == session_id:
                yield r
                if r.kind == Kind.SESSION_CLOSE:
                    return


def list_alerts(store_dir: str) -> list[dict]:
    alerts, acks = [], {}
    for r in iter_records(store_dir, strict=False):
        if r.kind == Kind.ALERT:
            alerts.append({**r.json(), "seq": r.seq})
        elif r.kind == Kind.ACK:
            j = r.json()
            acks[j.get("alert")] = j
    for a in alerts:
        a["ack"] = acks.get(a["id"])
    return alerts
