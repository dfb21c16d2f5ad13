"""With the kernel's `pending` map full, a proof names no socket: a socket
going around the proxy, bound to the same port as one that dialed the
proxy's port, must still be a bypass (it waits for the proxy's table, which
never knows it). Real kernel, a witness whose `pending` holds four sockets."""

from __future__ import annotations

import json
import subprocess

import pytest

from agent.witness import loader

from . import helpers
from .conftest import running_witness, witness_config

PORT, DROPPED_PORT = 18451, 18452
PROXY_PORT = witness_config().proxy.port    # no proxy runs: a plain server takes its port
PENDING = 4
NFT = ["ip", "netns", "exec", helpers.NETNS, "nft"]

FULL_THEN_TWINS = r"""
import json, os, socket, sys, time
held = []
for _ in range(int(sys.argv[3])):     # SYNs dropped: each waits in the kernel's `pending`
    s = socket.socket(); s.setblocking(False); s.connect_ex(("127.0.0.1", int(sys.argv[4])))
    held.append(s)
def bound(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); return s
a = bound(0); port = a.getsockname()[1]
a.connect(("127.0.0.1", int(sys.argv[1])))      # goes around the proxy
b = bound(port); b.connect(("127.0.0.1", int(sys.argv[2])))   # the proxy's port, proven late
print(json.dumps({"pid": os.getpid(), "sport": port}), flush=True)
time.sleep(30)
"""


@pytest.fixture(scope="module")
def servers(netns_inode):
    procs = [helpers.start_server(p) for p in (PORT, PROXY_PORT)]
    subprocess.run(NFT + ["-f", "-"], check=True, text=True, input=(
        "table inet tgwfull {\n chain out {\n type filter hook output priority 0;\n"
        f"  tcp dport {DROPPED_PORT} tcp flags syn drop\n }}\n}}\n"))
    yield
    subprocess.run(NFT + ["delete", "table", "inet", "tgwfull"], capture_output=True)
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def witness(servers, store, sessions):
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(loader, "MAX_PENDING", PENDING)   # compiled into the maps at start
        w = running_witness(witness_config(perf_pages=64), store, sessions)
    yield w
    w.stop()


def test_a_bypass_beside_a_port_only_proof_is_still_a_bypass(witness, store_dir):
    with helpers.held_subject(FULL_THEN_TWINS, str(PORT), str(PROXY_PORT), str(PENDING),
                              str(DROPPED_PORT)) as p:
        out = json.loads(p.stdout.readline())
        a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"],
                               tgid=out["pid"], dport=PORT)
    assert a["evidence"]["tcp_states"][-1] == "ESTABLISHED"
    assert witness.check.counts["tcp_port_proof_waits"] >= 1
