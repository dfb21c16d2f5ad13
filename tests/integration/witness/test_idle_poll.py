"""The witness's poll sleeps while the kernel holds no subject socket, and the
kernel wakes it when it holds one: an idle agent does not wake every
UNPROVEN_POLL_MS, and a bypass by a process that was already running (no
exec event to wake the poll) is judged within its window and one short
poll, not after the idle sleep. A stream of proxied connections (each held
by the kernel for a moment until proven) wakes the poll about once a short
poll, not once a connection."""

from __future__ import annotations

import json
import threading
import time

import psutil
import pytest

from agent.store import Kind, StoreWriter, iter_records
from agent.witness.witness import IDLE_POLL_MS, UNPROVEN_POLL_MS

from . import helpers
from .conftest import FakeSessions, running_witness, witness_config

PORT = 18461
PROXY_PORT = witness_config().proxy.port   # a plain server takes the proxy's port
WINDOW_MS = 20     # below IDLE_POLL_MS, so a missed wake-up shows
CONNECT_ON_CUE = """
import json, socket, sys, time
sys.stdin.readline()
t = time.time_ns()
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
print(json.dumps({"sport": s.getsockname()[1], "t": t}), flush=True)
time.sleep(30)
"""
# Connections to the proxy's port, one every 2 ms after the cue: each is
# held in `pending` until the kernel proves it, which used to arm a wake-up.
STREAM_ON_CUE = """
import socket, sys, time
n, port = int(sys.argv[1]), int(sys.argv[2])
sys.stdin.readline()
t = time.monotonic()
for i in range(n):
    socket.create_connection(("127.0.0.1", port)).close()
    time.sleep(max(0, t + i * 0.002 - time.monotonic()))
print(time.monotonic() - t, flush=True)
"""
STREAM = 500


@pytest.fixture(scope="module")
def witness(netns_inode, tmp_path_factory):
    servers = [helpers.start_server(p) for p in (PORT, PROXY_PORT)]
    store = StoreWriter(tmp_path_factory.mktemp("idle-store"))
    w = running_witness(witness_config(guard=False, match_window_ms=WINDOW_MS), store,
                        FakeSessions())
    yield w
    w.stop()
    store.close()
    for server in servers:
        server.kill()
        server.wait()


def poll_wakeups() -> int:
    """Voluntary context switches of the witness's poll thread so far."""
    [tid] = [t.native_id for t in threading.enumerate() if t.name == "tollgate-witness"]
    return psutil.Process(tid).num_ctx_switches().voluntary


def written_ns(store_dir, sport: int) -> int:
    """When the bypass alert for sport was written: its record's time."""
    return next(r.ts_ns for r in iter_records(store_dir, strict=False)
                if r.kind == Kind.ALERT and r.json()["type"] == "bypass"
                and r.json()["evidence"].get("sport") == sport)


def test_an_idle_poll_sleeps(witness):
    time.sleep(2 * IDLE_POLL_MS / 1000)   # the start's own events are judged by now
    before, t0 = poll_wakeups(), time.monotonic()
    time.sleep(2)
    rate = (poll_wakeups() - before) / (time.monotonic() - t0)
    assert rate < 1000 / UNPROVEN_POLL_MS / 2, f"{rate:.1f} wake-ups a second"


def test_the_kernel_wakes_the_poll_for_a_bypass(witness):
    with helpers.held_subject(CONNECT_ON_CUE, str(PORT), stdin=True) as p:
        time.sleep(2 * IDLE_POLL_MS / 1000)   # its exec and fork events are judged
        woke = poll_wakeups()
        deadline = time.monotonic() + 2
        while poll_wakeups() == woke and time.monotonic() < deadline:
            time.sleep(0.001)
        # The poll has just gone back to sleep for up to IDLE_POLL_MS: connect now.
        p.stdin.write("go\n")
        p.stdin.flush()
        out = json.loads(p.stdout.readline())
        helpers.wait_alert(witness.store.dir, type="bypass", sport=out["sport"])
        late_ms = (written_ns(witness.store.dir, out["sport"]) - out["t"]) / 1e6
        assert late_ms < WINDOW_MS + IDLE_POLL_MS / 2, f"judged {late_ms:.0f} ms after connect"


def test_a_stream_of_proxied_connections_wakes_the_poll_once_a_short_poll(witness):
    proven = witness.probes.proven()
    with helpers.held_subject(STREAM_ON_CUE, str(STREAM), str(PROXY_PORT), stdin=True) as p:
        time.sleep(2 * IDLE_POLL_MS / 1000)   # its exec and fork events are judged
        before = poll_wakeups()
        p.stdin.write("go\n")
        p.stdin.flush()
        took = float(p.stdout.readline())
        woke = poll_wakeups() - before
    assert witness.probes.proven() - proven == STREAM   # each was held, then proven
    # Once a connection it was ~STREAM; allow twice the short polls' pace.
    limit = 2 * took * 1000 / UNPROVEN_POLL_MS + 10
    assert woke < limit, f"{woke} wake-ups for {STREAM} connections in {took:.2f} s"
