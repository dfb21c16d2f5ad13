"""Session and alert summaries folded from the store's records."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from agent.review import attribution
from agent.review.decoders import DETECT_BYTES, detect
from agent.review.fold import fold
from agent.review.view import decoder_protocol
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
    open_protocol: str | None = None  # what SESSION_OPEN says (DNS over UDP only)
    # the first bytes of each direction, for protocol detection
    first: list[bytearray] = field(default_factory=lambda: [bytearray(), bytearray()], repr=False)

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
        uid = self.info.get("uid", chain[0].get("uid") if chain else None)
        return attribution.user_name(uid) or str(uid if uid is not None else "?")

    @property
    def chain(self) -> list[dict]:
        """The process chain, login first."""
        return attribution.session_chain(self.info)

    @property
    def protocol(self) -> str:
        """Detected from the first bytes (as the replay's decoder does); "-" before any."""
        named = decoder_protocol(self.open_protocol)
        if named:
            return named
        if not any(self.first):
            return "-"
        return detect(bytes(self.first[0]), bytes(self.first[1]), self.original_dst[1]) or "opaque"

    def as_dict(self) -> dict:
        return {"id": self.id, "start_ns": self.start_ns, "end_ns": self.end_ns,
                "client": list(self.client), "original_dst": list(self.original_dst),
                "subject": self.subject, "process": self.process, "protocol": self.protocol,
                "client_bytes": self.bytes[0], "server_bytes": self.bytes[1],
                "state": self.state, "chain": self.chain, "attribution": self.info,
                "close": self.close}


def _add_data(s: SessionSummary, r: Record) -> None:
    _, d, data = r.data()
    s.bytes[d] += len(data)
    first = s.first[d]
    if len(first) < DETECT_BYTES:
        first += data[:DETECT_BYTES - len(first)]


class SessionFold:
    """Every session's summary, folded from the records in store order."""

    def __init__(self) -> None:
        self.sessions: dict[int, SessionSummary] = {}

    def add(self, r: Record) -> None:
        if r.kind == Kind.DATA:
            s = self.sessions.get(r.data()[0])
            if s is not None:
                _add_data(s, r)
        elif r.kind == Kind.SESSION_OPEN:
            j = r.json()
            self.sessions[r.seq] = SessionSummary(r.seq, r.ts_ns, tuple(j["client"]),
                                                  tuple(j["original_dst"]), open_protocol=j.get("protocol"))
        elif r.kind in (Kind.SESSION_INFO, Kind.SESSION_CLOSE):
            j = r.json()
            s = self.sessions.get(j.get("session"))
            if s is None:
                return
            if r.kind == Kind.SESSION_INFO:
                s.info = j
            else:
                s.close, s.end_ns = j, r.ts_ns

    def result(self) -> list[SessionSummary]:
        return sorted(self.sessions.values(), key=lambda s: s.id)


def list_sessions(store_dir: str) -> list[SessionSummary]:
    return fold(store_dir, SessionFold())[0]


def session_of(r: Record) -> int | None:
    """The session a record belongs to, if it is a session record."""
    if r.kind == Kind.DATA:
        return r.data()[0]
    if r.kind == Kind.SESSION_OPEN:
        return r.seq
    if r.kind in (Kind.SESSION_INFO, Kind.SESSION_CLOSE):
        sid = r.json().get("session")
        return sid if isinstance(sid, int) else None
    return None


# The agent's events that name sessions: it handed them to the next run,
# or took them over from the last (agent/proxy/handover.py).
HANDOVER_EVENTS = frozenset({"sessions_handed_over", "sessions_resumed"})


def concerns(r: Record, session_id: int) -> bool:
    """Whether a record belongs in the session's replay: its own records,
    and the agent's hand-overs of it across a restart."""
    if r.kind == Kind.EVENT:
        j = r.json()
        return j.get("event") in HANDOVER_EVENTS and session_id in (j.get("sessions") or ())
    return session_of(r) == session_id


def session_records(store_dir: str, session_id: int) -> Iterator[Record]:
    """The records of one session, in store order, from its SESSION_OPEN
    (whose seq is the session id, so earlier segments are not read)."""
    for r in iter_records(store_dir, strict=False, start_seq=session_id):
        if concerns(r, session_id):
            yield r
            if r.kind == Kind.SESSION_CLOSE:
                return


class AlertFold:
    """Every alert with its ack (or None) and the process chain behind it."""

    def __init__(self) -> None:
        self.alerts: list[dict] = []
        self.acks: dict[object, dict] = {}
        self.infos: dict[object, dict] = {}

    def add(self, r: Record) -> None:
        if r.kind == Kind.ALERT:
            self.alerts.append({**r.json(), "seq": r.seq})
        elif r.kind == Kind.ACK:
            j = r.json()
            self.acks[j.get("alert")] = {**j, "time_ns": r.ts_ns}
        elif r.kind == Kind.SESSION_INFO:
            j = r.json()
            self.infos[j.get("session")] = j

    def result(self) -> list[dict]:
        for a in self.alerts:
            a["ack"] = self.acks.get(a["id"])
            a["chain"], a["chain_source"] = attribution.alert_chain(a, self.infos)
        return self.alerts


def list_alerts(store_dir: str) -> list[dict]:
    return fold(store_dir, AlertFold())[0]


def sorted_alerts(alerts: list[dict]) -> list[dict]:
    """Unacknowledged first, then in store order."""
    return sorted(alerts, key=lambda a: (a["ack"] is not None, a["seq"]))
