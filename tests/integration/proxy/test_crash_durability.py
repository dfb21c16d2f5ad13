"""Issue 4 under a real agent: kill -9 at random moments during heavy traffic,
50 times. After each restart the store verifies; in fsync mode every byte a
peer received is in the store (record before forward, made durable first)."""

from __future__ import annotations

import hashlib
import json
import random
import signal
import subprocess
import sys
import time

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import CORP_V4, Sandbox, wait_for
from agent.demo.servers import port_open
from agent.review.replay import raw_bytes
from agent.review.sessions import list_sessions, session_records
from agent.store import Direction
from agent.store.verify import verify

from conftest import EXACT_PORT, PEERS, server_lines

ROUNDS = int(__import__("os").environ.get("TG_CRASH_ROUNDS", "50"))


@pytest.fixture(scope="module")
def crash_sandbox(tmp_path_factory):
    sb = Sandbox(prefix="tgk", subject="tgsubject")
    sb.up()
    out = tmp_path_factory.mktemp("crash") / "server.jsonl"
    sb.spawn(sb.corp, [sys.executable, PEERS, "server", str(EXACT_PORT), str(out)])
    wait_for(lambda: port_open(sb, sb.corp, CORP_V4, EXACT_PORT), 15, what="peer")
    yield sb, out
    sb.down()


def stored(store, sid: int, d: Direction) -> bytes:
    return b"".join(raw_bytes(session_records(store, sid), d))


def test_kill9_during_traffic_fsync_mode(crash_sandbox, tmp_path):
    sb, server_out = crash_sandbox
    agent = AgentProcess(sb, workdir=str(tmp_path), extra='durability = "fsync"\n[witness]\nenabled = false\n')
    rng = random.Random(4)
    connected = 0
    try:
        for round_ in range(ROUNDS):
            agent.start()
            size = (64 << 20) + round_  # names this round's line in the server's output
            client = subprocess.Popen(sb.argv(sb.bastion, [sys.executable, PEERS, "client",
                                                           CORP_V4, str(EXACT_PORT), str(size)],
                                              user=sb.subject), stdout=subprocess.PIPE, text=True)
            # The kill comes during the traffic, however slowly a loaded
            # machine starts the client (or at once if it could not dial).
            wait_for(lambda: dialled(sb) or client.poll() is not None, 10,
                     what="the client's connection")
            time.sleep(rng.uniform(0.0, 0.35))
            agent.stop(signal.SIGKILL)
            got = json.loads(client.communicate(timeout=60)[0])
            if got.get("connected", True):  # else the kill came before the client dialled
                connected += 1
                check_prefix(agent.store, got, server_out, round_, size)
        assert connected >= ROUNDS // 2, f"only {connected} of {ROUNDS} rounds reached the agent"
        agent.start()
        report = verify(agent.store, allow_torn_tail=True)
        assert report.ok, report.failures[:3]
    finally:
        agent.stop()
        subprocess.run(["chattr", "-R", "-i", str(agent.store)], capture_output=True)
    report = verify(agent.store)
    assert report.ok, report.failures[:3]
    assert report.records > ROUNDS * 5


def dialled(sb: Sandbox) -> bool:
    """The subject's connection to the peer is established (as its socket sees it)."""
    r = sb.run(sb.bastion, ["ss", "-Htn", "state", "established", "dst",
                            f"{CORP_V4}:{EXACT_PORT}"], capture_output=True, text=True)
    return bool(r.stdout.strip())


def server_line(server_out, size: int) -> dict | None:
    """The server's line for this round; None if the server never got the
    head (recorded, the agent killed before forwarding it)."""
    try:
        return wait_for(lambda: next((s for s in server_lines(server_out) if s["size"] == size),
                                     None), 5, what="the server's line")
    except TimeoutError:
        return None


def check_prefix(store, client: dict, server_out, round_: int, size: int) -> None:
    """What each peer received is a prefix of what the store holds for it."""
    sessions = list_sessions(store)
    if not sessions or sessions[-1].bytes == [0, 0]:
        assert client["recv_bytes"] == 0  # killed before anything was relayed
        return
    sid = sessions[-1].id
    down = stored(store, sid, Direction.SERVER)
    assert len(down) >= client["recv_bytes"], (round_, len(down), client)
    assert hashlib.sha256(down[:client["recv_bytes"]]).hexdigest() == client["recv_sha"]
    up = stored(store, sid, Direction.CLIENT)
    srv = server_line(server_out, size) if len(up) >= 8 else None
    if srv is not None:
        assert srv["recv_bytes"] <= len(up), (round_, len(up), srv)
        assert hashlib.sha256(up[:srv["recv_bytes"]]).hexdigest() == srv["recv_sha"]
