"""Alert types and the one way to record one.

An alert is a store record (Kind.ALERT) whose JSON carries its type, a
severity, a one-line summary and its evidence (DESIGN.md invariant 4: time,
5-tuple, original destination, pid, process chain, uid, cgroup, netns, probe).
Every part that raises alerts goes through record_alert() so that the shape
is the same for review and shipping.
"""

from __future__ import annotations

import enum
import logging
import time
import uuid
from typing import Any, Protocol

from agent.store.format import Kind

log = logging.getLogger("tollgate.alerts")


class AlertType(str, enum.Enum):
    BYPASS = "bypass"
    UDP_BLOCKED = "udp_blocked"
    RAW_SOCKET = "raw_socket"
    NETNS = "netns"
    UID_CHANGE = "uid_change"
    POLICY_DENIED = "policy_denied"
    RULES_TAMPERED = "rules_tampered"
    RULES_REMOVED = "rules_removed"
    EVENTS_LOST = "events_lost"
    PREEXISTING_SOCKET = "preexisting_socket"
    STORE_FAILED = "store_failed"
    UPSTREAM_FAILED = "upstream_failed"
    SHIP_BACKLOG = "ship_backlog"
    PROXY_REFUSED = "proxy_refused"
    WITNESS_ERROR = "witness_error"
    STORE_UNSEALED = "store_unsealed"


SEVERITY = {
    AlertType.BYPASS: "critical", AlertType.RULES_TAMPERED: "critical",
    AlertType.RULES_REMOVED: "warning", AlertType.EVENTS_LOST: "critical",
    AlertType.STORE_FAILED: "critical", AlertType.NETNS: "high",
    AlertType.RAW_SOCKET: "high", AlertType.UID_CHANGE: "high",
    AlertType.POLICY_DENIED: "high", AlertType.PREEXISTING_SOCKET: "high",
    AlertType.UDP_BLOCKED: "medium", AlertType.SHIP_BACKLOG: "high",
    AlertType.UPSTREAM_FAILED: "low", AlertType.PROXY_REFUSED: "high",
    AlertType.WITNESS_ERROR: "critical", AlertType.STORE_UNSEALED: "high",
}


class Appender(Protocol):
    def defer_json(self, kind: Kind, obj: dict) -> int | None:
        """Append now, or keep it until the store appends again (StoreWriter)."""
        ...


def make_alert(type_: AlertType, summary: str, **evidence: Any) -> dict:
    return {"id": uuid.uuid4().hex[:16], "type": type_.value,
            "severity": SEVERITY.get(type_, "high"), "summary": summary,
            "time_ns": evidence.pop("time_ns", None) or time.time_ns(),
            "evidence": evidence}


def record_alert(store: Appender, type_: AlertType, summary: str, **evidence: Any) -> dict:
    """Append an alert record; returns the alert (with its id)."""
    alert = make_alert(type_, summary, **evidence)
    # The record's own time is when it was written (detection); the alert's
    # time_ns is when the thing happened (the kernel's event time).
    # Deferred while the store fails: an alert raised then (a bypass during a
    # full disk) is written when it recovers, and its raiser goes on.
    store.defer_json(Kind.ALERT, alert)
    log.warning("alert %s %s: %s", alert["id"], alert["type"], summary)
    return alert
