"""Who did it: the process chain behind a session or an alert, login first.

The proxy's SESSION_INFO and the witness's alert evidence both list the
chain nearest first (the connecting process, then its parents); a reviewer
reads it the other way, from the subject's login down to the process that
connected, so everything here returns and prints it login first.
"""

from __future__ import annotations

import os
import pwd
from typing import Iterable

from agent.review.text import clean

Chain = list[dict]


def login_first(chain: Iterable[dict] | None) -> Chain:
    """A nearest-first chain (as recorded) turned login first."""
    return list(reversed(list(chain or [])))


def session_chain(info: dict) -> Chain:
    """The chain of a session's SESSION_INFO, login first."""
    return login_first(info.get("chain"))


def alert_chain(alert: dict, session_infos: dict[int, dict]) -> tuple[Chain, str]:
    """(chain login first, where it came from) for an alert.

    Witness alerts carry their own chain (from its exec/fork events); proxy
    alerts name a session whose SESSION_INFO has one.
    """
    evidence = alert.get("evidence") or {}
    if evidence.get("process_chain"):
        probe = evidence.get("probe") or "witness"
        return login_first(evidence["process_chain"]), f"witness ({probe})"
    sid = evidence.get("session")
    if isinstance(sid, int) and session_infos.get(sid, {}).get("chain"):
        return session_chain(session_infos[sid]), f"session {sid}"
    by = evidence.get("by")
    if isinstance(by, dict) and by.get("pid"):
        return [by], "operator"
    return [], "none"


def user_name(uid: object) -> str | None:
    """The local name of a uid (witness chains carry the uid only)."""
    try:
        return pwd.getpwuid(int(uid)).pw_name  # type: ignore[arg-type]
    except (KeyError, TypeError, ValueError):
        return None


def _name(p: dict) -> str:
    exe = p.get("exe") or p.get("comm") or "?"
    return os.path.basename(str(exe)) or str(exe)


def argv_text(p: dict) -> str:
    argv = p.get("argv")
    if not argv:
        return str(p.get("comm") or p.get("exe") or "")
    cut = p.get("argv_cut_bytes")
    more = f" [{cut} more bytes of argv not recorded]" if cut else ""
    return " ".join(str(a) for a in argv) + more


def one_line(chain: Chain, width: int | None = 160) -> str:
    """`setpriv[12 uid 0] > psql[31 uid 999]: psql -h ...` for tables."""
    if not chain:
        return "(no process attributed)"
    hops = " > ".join(f"{_name(p)}[{p.get('pid', '?')} uid {p.get('uid', '?')}]" for p in chain)
    line = clean(f"{hops}: {argv_text(chain[-1])}", newlines=False)
    if width is not None and len(line) > width:
        line = line[: width - 3] + "..."
    return line


def detail_lines(chain: Chain) -> list[str]:
    """One line a process: pid, uid, user, exe and the whole argv."""
    out = []
    for depth, p in enumerate(chain):
        name = p.get("user") or user_name(p.get("uid"))
        user = f" ({name})" if name else ""
        out.append(clean(f"{'  ' * depth}pid {p.get('pid', '?')} uid {p.get('uid', '?')}{user} "
                         f"{p.get('exe') or p.get('comm') or '?'}: {argv_text(p)}", newlines=False))
    return out
