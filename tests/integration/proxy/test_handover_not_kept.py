"""The sessions a stopping agent handed over whose sockets did not come
back (`systemctl stop`, not a restart: systemd reset them) are closed by the
next start, with the reason, the counts the relay had, and a duration that
ends at the stop; nothing of the hand-over is left behind. (The way through
systemd's store itself: tests/integration/packaging/test_systemd_boot.py.)"""

from __future__ import annotations

import json
import socket
import time

import pytest

from agent.daemon import STOPPED_NOT_RESTARTED
from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import Sandbox
from agent.proxy import handover
from agent.proxy.handover import Handed
from agent.proxy.sessions import Session
from agent.review.sessions import list_sessions
from agent.store import Kind, StoreWriter, iter_records

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sandbox():
    with Sandbox(prefix="tgh", subject="tghsubject") as sb:
        yield sb


@pytest.mark.parametrize("plane", ["native", "python"])
def test_the_next_start_closes_what_systemd_did_not_keep(sandbox, tmp_path, monkeypatch, plane):
    agent = AgentProcess(sandbox, workdir=str(tmp_path / "agent"),
                         proxy=f'data_plane = "{plane}"\n', extra="[witness]\nenabled = false\n")
    w = StoreWriter(agent.store, immutable=False)
    started = time.time_ns() - 60_000_000_000               # a minute before the stop
    sid = w.append_json(Kind.SESSION_OPEN, {"client": ["127.0.0.1", 40000],
                                            "original_dst": ["10.1.2.3", 22], "time_ns": started})
    w.close()
    a, b = socket.socketpair()
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)     # the sockets are not kept
    handover.give([Handed(Session(sid, ("127.0.0.1", 40000), ("10.1.2.3", 22), started), 321, 4567,
                          (b"", b"pending"), (handover.LIVE, handover.LIVE),
                          (a.detach(), b.detach()))], str(agent.store))
    stopped = time.time_ns()
    agent.start()
    status = json.loads(agent.cli("status", "--json", text=True).stdout)
    agent.stop()
    assert status["sessions"]["not_resumed_at_start"] == 1        # in `tollgate status` too
    [s] = [s for s in list_sessions(agent.store) if s.id == sid]
    assert s.close["reason"] == STOPPED_NOT_RESTARTED
    assert (s.close["client_bytes"], s.close["server_bytes"]) == (321, 4567)
    assert 59_000 < s.close["duration_ms"] <= (stopped - started) / 1e6 + 1
    [event] = [r.json() for r in iter_records(agent.store)
               if r.kind == Kind.EVENT and r.json()["event"] == "sessions_resumed"]
    assert event["sessions"] == [] and event["not_resumed"] == [sid]
    assert not (agent.store / handover.STATE).exists()
