"""Fail closed, on either data plane: when the store's disk fills in the
middle of a session, the relay resets it, forward nothing they could
not record, and the agent raises store_failed once the store appends again."""

from __future__ import annotations

import contextlib
import json
import pwd
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import small_disk
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


@contextlib.contextmanager
def agent_on_tmpfs(tmp_path: Path, size: str, **agent_kw) -> Iterator[tuple]:
    """(sandbox, agent not yet started, store dir): the store on its own
    small tmpfs, to be filled; checked whole by verify at the end."""
    sb = Sandbox(prefix="tgf", subject="tgfsubject")
    sb.up()
    work = tmp_path / "agent"
    store = work / "store"
    store.mkdir(parents=True)
    try:
        with small_disk.tmpfs(store, size):
            agent = AgentProcess(sb, workdir=str(work), **agent_kw)
            try:
                yield sb, agent, store
            finally:
                agent.stop()
                subprocess.run(["chattr", "-R", "-i", str(store)], capture_output=True)
                assert verify(store).ok
    finally:
        sb.down()


@pytest.mark.parametrize("plane", ["native", "python"])
def test_store_full_resets_the_session_then_alerts(tmp_path, plane):
    with agent_on_tmpfs(tmp_path, "24m", proxy=f'data_plane = "{plane}"\n',
                        extra="[witness]\nenabled = false\n") as (sb, agent, store):
        received = tmp_path / "received"
        sb.spawn(sb.corp, [sys.executable, "-c", SINK, str(received)])
        agent.start()
        r = sb.subject_run([sys.executable, "-c", STREAM], text=True, timeout=60)
        out = json.loads(r.stdout)
        # cut near 24 MiB (plus what socket buffers hold), not after 256 MiB
        assert out["error"] is not None and out["sent"] < 64 << 20, out

        small_disk.resize(store, "512m")
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


ATTEMPTS = f"""
import socket, sys
for _ in range(int(sys.argv[1])):
    try:
        socket.create_connection(("{CORP_V4}", 9199), 5).recv(1)
    except OSError:
        pass
"""


def test_a_connection_refused_unrecorded_is_an_alert_naming_who_tried(tmp_path):
    """While the store cannot take a session's opening record the connection
    is refused; who tried, and where, is a proxy_refused alert kept until
    the store appends again (before: nothing but the store_failed alert)."""
    with agent_on_tmpfs(tmp_path, "16m") as (sb, agent, store):
        healthy = lambda: json.loads(agent.cli("status", "--json").stdout)["store_healthy"]  # noqa: E731
        agent.start()
        filler = store / "filler"      # not a segment: the store ignores it
        subprocess.run(["dd", "if=/dev/zero", f"of={filler}", "bs=1M", "count=64"],
                       capture_output=True)
        for _ in range(40):            # what the segment had faulted in takes records
            sb.subject_run([sys.executable, "-c", ATTEMPTS, "50"], timeout=60)
            if not healthy():
                break
        sb.subject_run([sys.executable, "-c", ATTEMPTS, "1"], timeout=30)   # refused, unrecorded
        filler.unlink()
        wait_for(healthy, 20, what="store healthy again")
        refused = wait_for(lambda: [a for a in list_alerts(str(store))
                                    if a["type"] == "proxy_refused"], 10, what="proxy_refused")
        uid = pwd.getpwnam(sb.subject).pw_uid
    ev = refused[-1]["evidence"]
    assert ev["original_dst"] == [CORP_V4, 9199] and "store failing" in ev["reason"]
    assert ev["uid"] == uid
    assert ev["chain"] and "python" in ev["chain"][0]["exe"]
