"""The session and alert tables of `tollgate sessions` and `tollgate alerts`.

Each row is followed by its process chain (login first), so who did it is
never a separate lookup. Process names, argv and alert summaries come from
the subject's side, so every line is cleaned (see text.py).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from agent.review import attribution
from agent.review.sessions import SessionSummary
from agent.review.text import address, clean, stamp

__all__ = ["session_lines", "alert_lines"]

_CHAIN_INDENT = " " * 10


def session_lines(sessions: Iterable[SessionSummary]) -> Iterator[str]:
    yield (f"{'ID':>8}  {'START':24} {'SUBJECT':10} {'DESTINATION':28} {'PROTOCOL':9} {'SENT':>10} "
           f"{'RECEIVED':>10}  STATE")
    for s in sessions:
        dst = address(s.original_dst)
        yield clean(f"{s.id:>8}  {stamp(s.start_ns):24} {s.subject:10} {dst:28} {s.protocol:9} "
                    f"{s.bytes[0]:>10} {s.bytes[1]:>10}  {s.state[:40]}", newlines=False)
        yield _CHAIN_INDENT + attribution.one_line(s.chain)


def alert_lines(alerts: Iterable[dict]) -> Iterator[str]:
    for a in alerts:
        ack = a.get("ack")
        mark = "acked" if ack else "NEW"
        yield clean(f"{a['id']}  {stamp(a['time_ns'])}  {mark:5} {a['severity']:8} "
                    f"{a['type']:18} {a['summary']}", newlines=False)
        if ack:
            who = (ack.get("by") or {}).get("user", "?")
            yield clean(f"{_CHAIN_INDENT}acked by {who} at {stamp(ack.get('time_ns') or 0)}: "
                        f"{ack.get('reason', '')}", newlines=False)
        source = a.get("chain_source", "none")
        yield f"{_CHAIN_INDENT}{attribution.one_line(a.get('chain') or [])} (from {source})"
