"""A subject chooses its processes' argv and file names. Whatever it picks,
its session is relayed and recorded with its process chain, and the store
stays healthy: argv too long for one record is kept in part and says how
much it left out; bytes that are not UTF-8 are shown escaped; a program's
path longer than an exec event carries is shown whole. Both ways of naming
the process: the witness's exec events (completed from /proc) and, without
the witness, sock_diag and /proc alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import CORP_V4, Sandbox, wait_for
from agent.proctext import MAX_ARGV_BYTES
from agent.review.sessions import list_alerts, list_sessions

PORT = 9110
ECHO = f"""
import socket
ls, held = socket.create_server(("0.0.0.0", {PORT})), []
while True:
    c, _ = ls.accept()
    c.sendall(c.recv(100))
    held.append(c)
"""

# Ten processes deep, each with ~1.8 MB of argv (exec takes at most 2 MiB
# under the default 8 MiB stack limit): 18 MB of argv in the chain, more
# than one store record holds. The last one connects, reports the size of
# its own argv area, which the evidence must account for to the byte, and
# stays until the test is done with it.
NEST = f"""
import json, os, socket, subprocess, sys
depth = int(sys.argv[1])
if depth:
    big = ["x" * 127_000] * 14
    sys.exit(subprocess.run([sys.executable, "-c", sys.argv[2], str(depth - 1), sys.argv[2],
                             os.fsdecode(b"caf\\xe9"), *big]).returncode)
s = socket.create_connection(("{CORP_V4}", {PORT}), 5)
s.sendall(b"ping")
reply = s.recv(100)
area = sum(len(os.fsencode(a)) + 1 for a in sys.orig_argv)
print(json.dumps({{"reply": reply.decode(), "argv_area": area}}), flush=True)
s.recv(1)
"""

pytestmark = pytest.mark.root


@pytest.mark.parametrize("witness", [True, False], ids=["witness", "proc"])
def test_argv_longer_than_a_record_and_not_utf8(tmp_path, witness):
    sb = Sandbox(prefix="tge", subject="tgesubject")
    sb.up()
    agent = AgentProcess(sb, workdir=str(tmp_path / "agent"),
                         extra="" if witness else "[witness]\nenabled = false\n")
    # The chain's top: a shell whose path is longer than an exec event's 128 bytes.
    deep = tempfile.mkdtemp(prefix="tg-deep-")   # the test's basetemp is 0700: not the subject's
    long_dir = os.path.join(deep, "d" * 100)
    os.makedirs(long_dir)
    shell = os.path.join(long_dir, "sh-" + "x" * 40)
    shutil.copy("/bin/dash", shell)
    for d in (deep, long_dir):
        os.chmod(d, 0o755)
    try:
        sb.spawn(sb.corp, [sys.executable, "-c", ECHO])
        agent.start()
        p = sb.spawn(sb.bastion, [shell, "-c", '"$0" -c "$1" 10 "$1"; exit $?', sys.executable,
                                  NEST], user=sb.subject, stdout=subprocess.PIPE, text=True)
        out = json.loads(p.stdout.readline())
        assert out["reply"] == "ping"

        def evidence():
            found = [s for s in list_sessions(str(agent.store)) if s.original_dst[1] == PORT]
            return found[0] if found and found[0].info.get("chain") else None
        s = wait_for(evidence, 20, what="the session's evidence")
        os.killpg(p.pid, signal.SIGKILL)
        chain = s.info["chain"]
        assert len(chain) >= 12, [c.get("argv", [])[:2] for c in chain]
        me = chain[0]
        assert me["argv"][1:5] == ["-c", NEST, "0", NEST]
        assert me["argv"][5] == "caf\\xe9"   # b"caf\xe9": the byte that is not UTF-8, named
        assert me["argv"][-1].startswith("x")    # cut inside the big arguments
        kept = sum(len(a.encode()) + 1 for a in me["argv"]) - len("\\xe9") + 1
        assert MAX_ARGV_BYTES <= kept <= MAX_ARGV_BYTES + 1   # the last one has no NUL
        assert me["argv_cut_bytes"] == out["argv_area"] - MAX_ARGV_BYTES
        assert all(c["argv_cut_bytes"] > 0 for c in chain[1:10])
        top = chain[11]
        assert top["exe"] == os.path.realpath(shell) and "exe_cut_bytes" not in top, top
        replay = agent.cli("replay", str(s.id), text=True).stdout
        assert f"[{me['argv_cut_bytes']} more bytes of argv not recorded]" in replay
        assert not [a for a in list_alerts(str(agent.store)) if a["type"] == "store_failed"]
        status = json.loads(agent.cli("status", "--json").stdout)
        assert status["store_healthy"] is True
    finally:
        agent.stop()
        subprocess.run(["chattr", "-R", "-i", str(agent.store)], capture_output=True)
        sb.down()
        shutil.rmtree(deep)
