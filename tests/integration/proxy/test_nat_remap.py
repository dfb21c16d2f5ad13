"""Two subject sockets on one local address and port, to two destinations
(SO_REUSEADDR): the redirect would make them one 4-tuple at the proxy, so
conntrack gives the second another source port. Neither is a bypass (the
witness asks conntrack, agent/conntrack.py), and the second session names
its process and the port its socket really had."""

from __future__ import annotations

import pwd
import subprocess
import sys
import time

from agent.demo.sandbox import BASTION_V4, CORP_V4, wait_for
from agent.review.sessions import list_alerts, list_sessions

from conftest import EXACT_PORT

TWINS = r"""
import socket, sys, time
a, b = socket.socket(), socket.socket()
for s in (a, b):
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
a.bind(("0.0.0.0", 0))
port = a.getsockname()[1]
b.bind(("0.0.0.0", port))
a.connect((sys.argv[1], int(sys.argv[2])))
b.connect((sys.argv[1], int(sys.argv[3])))
a.sendall(b"first twin\n"); b.sendall(b"second twin\n")
print(port, flush=True)
sys.stdin.read()
"""


def test_twin_sockets_on_one_port_are_recorded_and_no_bypass(agent, sandbox, servers):
    dsts = [(CORP_V4, EXACT_PORT), (CORP_V4, servers["http"].port)]
    uid = pwd.getpwnam(sandbox.subject).pw_uid
    twins = sandbox.spawn(sandbox.bastion, [sys.executable, "-c", TWINS, CORP_V4,
                                            str(EXACT_PORT), str(dsts[1][1])],
                          user=sandbox.subject, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          text=True)
    try:
        port = int(twins.stdout.readline())
        found = wait_for(lambda: _attributed(agent, dsts, port), 15, what="both twins' sessions")
        time.sleep(2.0)   # past the witness's window, and its patience for a port-only proof
        bypasses = [a for a in list_alerts(agent.store) if a["type"] == "bypass"
                    and a["evidence"].get("sport") == port]
    finally:
        twins.stdin.close()
        twins.wait(10)
    first, second = found
    assert first.client == (BASTION_V4, port) and "client_before_nat" not in first.info
    assert second.client[1] != port                       # what conntrack made of it
    assert second.info["client_before_nat"] == [BASTION_V4, port]
    assert first.info["uid"] == second.info["uid"] == uid
    assert first.info["pid"] == second.info["pid"] == twins.pid
    assert not bypasses
    replay = agent.cli("replay", str(second.id), text=True)
    assert f"client socket {BASTION_V4}:{port} (conntrack changed its port" in replay.stdout
    assert "second twin" in replay.stdout


def _attributed(agent, dsts, port):
    """The twins' two sessions, once both name their process."""
    by_dst = {s.original_dst: s for s in list_sessions(agent.store)
              if s.original_dst in dsts and "pid" in s.info
              and (s.client[1] == port or s.info.get("client_before_nat", [0, 0])[1] == port)}
    return [by_dst[d] for d in dsts] if len(by_dst) == 2 else None
