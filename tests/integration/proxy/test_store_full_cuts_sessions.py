"""Fail closed, on either data plane: when the store's disk fills in the
middle of a session, the relay resets it, forward nothing they could
not record, and the agent raises store_failed once the store appends again."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import CORP_V4, Sandbox, wait_for
from agent.review.sessions import list_alerts
from agent.store import Kind, iter_records, verify

SINK = """
import socket, sys
ls = socket.create_server(("0.0.0.0", 9100))
c, _ = ls.accept()
n = 0
try:
    while (b := c.recv(1 << 16)):
        n += len(b)
except OSError:
    pass
open(sys.argv[1], "w").write(str(n))
"""

STREAM = f"""
import json, socket
s = socket.create_connection(("{CORP_V4}", 9100), 5)
block, sent, error = b"\\xa5" * (1 << 20), 0, None
try:
    for _ in range(256):
        s.sendall(block)
        sent += len(block)
except OSError as e:
    error = type(e).__name__
print(json.dumps({{"sent": sent, "error": error}}))
"""


@pytest.mark.parametrize("plane", ["native", "python"])
def test_store_full_resets_the_session_then_alerts(tmp_path, plane):
    sb = Sandbox(prefix="tgf", subject="tgfsubject")
    sb.up()
    work = tmp_path / "agent"
    store = work / "store"
    store.mkdir(parents=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(store)], check=True)
    agent = AgentProcess(sb, workdir=str(work), proxy=f'data_plane = "{plane}"\n',
                         extra="[witness]\nenabled = false\n")
    try:
        received = tmp_path / "received"
        sb.spawn(sb.corp, [sys.executable, "-c", SINK, str(received)])
        agent.start()
        r = sb.subject_run([sys.executable, "-c", STREAM], text=True, timeout=60)
        out = json.loads(r.stdout)
        # cut near 24 MiB (plus what socket buffers hold), not after 256 MiB
        assert out["error"] is not None and out["sent"] < 64 << 20, out

        subprocess.run(["mount", "-o", "remount,size=512m", str(store)], check=True)
        # The agent probes the store each second; new connections are refused until then.
        wait_for(lambda: json.loads(agent.cli("status", "--json").stdout).get("store_healthy"),
                 20, what="store healthy again")
        alert = wait_for(lambda: [a for a in list_alerts(str(store))
                                  if a["type"] == "store_failed"], 10, what="store_failed alert")
        assert "No space left" in alert[0]["evidence"]["error"]

        recs = list(iter_records(store))
        close = next(json.loads(r.payload) for r in recs if r.kind == Kind.SESSION_CLOSE)
        assert close["reason"].startswith("store failed:"), close
        recorded = sum(len(r.data()[2]) for r in recs if r.kind == Kind.DATA)
        got = int(wait_for(lambda: received.exists() and received.read_text(), 10, what="sink"))
        # nothing forwarded unrecorded; the close record counts what the store holds
        assert got <= recorded == close["client_bytes"]
    finally:
        agent.stop()
        subprocess.run(["chattr", "-R", "-i", str(store)], capture_output=True)
        assert verify(store).ok
        subprocess.run(["umount", "-l", str(store)], check=True)
        sb.down()
