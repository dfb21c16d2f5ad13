"""The tables of `tollgate sessions`, `tollgate alerts` and `tollgate runs`.

Each row is followed by its process chain (login first), so who did it is
never a separate lookup. Process names, argv and alert summaries come from
the subject's side, so every line is cleaned (see text.py).
"""

from __future__ import annotations

from typing import Iterable, Iterator

from agent.review import attribution
from agent.review.runs import AgentRun, as_dicts
from agent.review.sessions import SessionSummary
from agent.review.text import address, clean, stamp

__all__ = ["session_lines", "alert_lines", "run_lines"]

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


def _yes_no(value: bool | None, yes: str = "on", no: str = "OFF") -> str:
    return "?" if value is None else yes if value else no


def run_lines(runs: list[AgentRun]) -> Iterator[str]:
    yield (f"{'STARTED':24} {'LAST RECORD':24} {'VERSION':10} {'WITNESS':7} {'SEALED':6} "
           f"{'DURABILITY':10} {'PLANE':6}  ENDED")
    for d in as_dicts(runs):
        yield clean(f"{stamp(d['started_ns']):24} {stamp(d['last_record_ns']):24} "
                    f"{d['version']:10} {_yes_no(d['witness']):7} "
                    f"{_yes_no(d['sealed'], 'yes', 'NO'):6} {d['durability'] or '?':10} "
                    f"{d['data_plane'] or '?':6}  {d['ended']}", newlines=False)
