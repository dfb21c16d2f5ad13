"""Stopping (an upgrade, a restart) lets a request in flight finish: the
agent stops accepting, gives live sessions proxy.stop_grace_s to end on their own,
and only then resets what is left, recorded with the reason."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import CORP_V4, Sandbox, wait_for
from agent.demo.servers import port_open
from agent.review.sessions import list_sessions

from conftest import PLANES

SLOW_PORT = 7004
# Answers each request line after 0.8 s, then closes.
SLOW_SERVER = r"""
import socket, sys, threading, time
def serve(c):
    with c:
        f = c.makefile("rb")
        line = f.readline()
        time.sleep(0.8)
        c.sendall(b"answer to " + line)
s = socket.create_server(("0.0.0.0", int(sys.argv[1])))
while True:
    threading.Thread(target=serve, args=(s.accept()[0],), daemon=True).start()
"""
CLIENT = r"""
import socket, sys
c = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=20)
c.sendall(sys.argv[3].encode() + b"\n")
out = b""
try:
    while chunk := c.recv(100):
        out += chunk
    print(out.decode().strip() or "EOF")
except ConnectionResetError:
    print("reset")
"""


@pytest.fixture(scope="module")
def sandbox():
    """A sandbox of its own: the suite's agent holds the shared one's port
    and rules, and this test stops agents. No witness: the drain is the
    proxy's alone, and two witnesses would judge each other's subject."""
    sb = Sandbox(prefix="tgd", subject="tgsubject")
    sb.up()
    sb.spawn(sb.corp, [sys.executable, "-c", SLOW_SERVER, str(SLOW_PORT)])
    wait_for(lambda: port_open(sb, sb.corp, CORP_V4, SLOW_PORT), 15, what="slow server")
    yield sb
    sb.down()


def client(sandbox, word: str) -> subprocess.Popen:
    return subprocess.Popen(sandbox.argv(sandbox.bastion, [sys.executable, "-c", CLIENT, CORP_V4,
                                                           str(SLOW_PORT), word],
                                         user=sandbox.subject),
                            stdout=subprocess.PIPE, text=True)


def stop_with_one_in_flight(sandbox, tmp_path, proxy: str) -> tuple[str, float, object]:
    """An agent with `proxy` config lines; a request in flight (its answer
    0.8 s away) when it is stopped. The client's outcome, how long the stop
    took, and the session as recorded."""
    agent = AgentProcess(sandbox, workdir=str(tmp_path / "agent"), proxy=proxy,
                         extra="[witness]\nenabled = false\n").start()
    try:
        waiting = client(sandbox, "ping")
        wait_for(lambda: [s for s in list_sessions(agent.store)
                          if s.original_dst == (CORP_V4, SLOW_PORT)], 10, what="session")
        t = time.monotonic()
        agent.stop()
        stopped_in = time.monotonic() - t
    finally:
        agent.stop()
    [s] = [s for s in list_sessions(agent.store) if s.original_dst == (CORP_V4, SLOW_PORT)]
    return waiting.communicate(timeout=20)[0].strip(), stopped_in, s


@pytest.mark.parametrize("plane", ["native", "python-uvloop"])
def test_a_request_in_flight_at_stop_gets_its_answer(sandbox, plane, tmp_path):
    got, stopped_in, s = stop_with_one_in_flight(sandbox, tmp_path, PLANES[plane])
    assert got == "answer to ping"
    assert stopped_in < 2.0 + 5       # the default grace, and the rest of a stop
    assert s.close["reason"] == "closed" and s.bytes == [5, 15]


@pytest.mark.parametrize("plane", ["native", "python-uvloop"])
def test_past_the_configured_grace_a_session_is_reset_with_the_reason(sandbox, plane, tmp_path):
    got, stopped_in, s = stop_with_one_in_flight(sandbox, tmp_path,
                                                 PLANES[plane] + "stop_grace_s = 0.1\n")
    assert got == "reset"
    assert s.close["reason"].startswith("agent stopping") and s.bytes == [5, 0]
