"""The proxy's session table: what the witness asks of it, and what it keeps."""

from __future__ import annotations

import sys
import time

from agent.proxy.sessions import Session, SessionTable


def session(sid: int, port: int) -> Session:
    return Session(sid, ("10.0.0.5", port), ("192.0.2.1", 5432), time.monotonic_ns(),
                   info={"chain": [{"pid": 1, "exe": "/usr/bin/psql"}] * 8})


def test_open_and_recently_closed_sessions_match_then_expire():
    t = SessionTable(linger_s=0.05)
    a = session(1, 40000)
    t.add(a)
    assert t.match("10.0.0.5", 40000, "192.0.2.1", 5432)
    t.close(a)
    assert t.match("10.0.0.5", 40000, "192.0.2.1", 5432)      # a late kernel report
    assert not t.match("10.0.0.5", 40001, "192.0.2.1", 5432)
    time.sleep(0.06)
    t.close(session(2, 40002))                                # closing expires older ones
    assert not t.match("10.0.0.5", 40000, "192.0.2.1", 5432)
    assert t.statistics() == {"open": 0, "recently_closed": 1, "opened_total": 1}


def test_a_closed_session_is_not_kept_whole_while_it_lingers():
    # At thousands of connections a second, linger_s of Sessions with their
    # attribution was tens of MiB: only the key may stay.
    t = SessionTable(linger_s=30)
    s = session(1, 40000)
    alone = sys.getrefcount(s)
    t.add(s)
    assert sys.getrefcount(s) == alone + 1
    t.close(s)
    assert sys.getrefcount(s) == alone
    assert t.match("10.0.0.5", 40000, "192.0.2.1", 5432)


def test_another_tables_sessions_match_too():
    # The native opener keeps the sessions it opened; the witness asks here.
    t = SessionTable()
    asked = []
    t.also = lambda *key: asked.append(key) or key[1] == 40005
    assert t.match("10.0.0.5", 40005, "192.0.2.1", 5432)
    assert not t.match("10.0.0.5", 40006, "192.0.2.1", 5432)
    t.add(session(1, 40007))
    assert t.match("10.0.0.5", 40007, "192.0.2.1", 5432)      # its own, without asking
    assert asked == [("10.0.0.5", 40005, "192.0.2.1", 5432), ("10.0.0.5", 40006, "192.0.2.1", 5432)]
