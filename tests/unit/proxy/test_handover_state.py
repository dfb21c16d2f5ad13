"""The hand-over's state beside the store (agent/proxy/handover.py): what a
stopping agent writes is what the next one reads, private to root, and a
state file the next agent cannot read loses its sessions, never the start.
(The sockets' way through systemd's store: tests/integration/packaging.)"""

from __future__ import annotations

import os
import socket
import stat

from agent.proxy import handover
from agent.proxy.handover import Handed
from agent.proxy.sessions import Session


def _handed(sid: int) -> Handed:
    a, b = socket.socketpair()
    return Handed(Session(sid, ("10.0.0.1", 40000 + sid), ("10.0.0.2", 22), 1_700_000_000_000_000_000 + sid),
                  100, 2000, (b"recorded, not sent\x00", b""), (handover.LIVE, handover.DONE),
                  (a.detach(), b.detach()))


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def test_what_one_agent_hands_over_the_next_reads(tmp_path, monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)     # no systemd: the sockets are not kept
    given = [_handed(7), _handed(9)]
    fds = [fd for h in given for fd in h.fds]
    handover.give(given, str(tmp_path))
    state = tmp_path / handover.STATE
    assert stat.S_IMODE(state.stat().st_mode) == 0o600    # it holds recorded payload
    assert not [fd for fd in fds if _is_open(fd)]          # systemd holds them, not the agent
    taken, stopped_ns = handover.take(str(tmp_path))
    assert stopped_ns > 0 and [h.fds for h in taken] == [None, None]
    for h in (*given, *taken):
        h.fds = None
    assert taken == given
    assert state.exists()                                  # until the sessions are dealt with
    handover.forget(str(tmp_path))
    assert not state.exists() and handover.take(str(tmp_path)) == ([], 0)


def test_an_unreadable_state_loses_its_sessions_not_the_start(tmp_path):
    state = tmp_path / handover.STATE
    for text in (b"{not json", b'{"sessions": [{"session": 1}], "stopped_ns": 5}', b"[]"):
        state.write_bytes(text)
        assert handover.take(str(tmp_path)) == ([], 0)
        assert not state.exists()
