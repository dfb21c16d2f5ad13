"""agent/conntrack.py against the kernel's conntrack, in a namespace with
a tollgate-like redirect for the subject: a redirected flow names the client
the proxy would accept, a flow that left around it is known and not
redirected, and a SYN a local rule dropped left no flow at all (what the
cross-check needs to call a socket that never established a bypass)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from . import helpers

NS, FAR = "tgw-ct", "tgw-ct-far"
ROOT = Path(__file__).resolve().parents[3]
PROXY_PORT, OUT_PORT, DROPPED_PORT = 15099, 9, 10
OUTSIDE = "10.201.0.2"       # nobody has it beyond the veth: SYNs leave, never answered
HOLD = r"""
import json, socket, sys, time
s = socket.socket(); s.setblocking(False)
s.connect_ex((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"sport": s.getsockname()[1]}), flush=True)
time.sleep(30)
"""
LOOKUP = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from agent import conntrack
out = {}
for name, src, sport, dport in json.loads(sys.argv[2]):
    f = conntrack.flow_of((src, sport), (sys.argv[3], dport), int(sys.argv[4]))
    out[name] = None if f is None else {"proxied_as": f.proxied_as}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def netns():
    helpers.ensure_subject()
    for ns in (NS, FAR):      # a run killed midway leaves them behind
        if Path(f"/run/netns/{ns}").exists():
            helpers.delete_netns(ns)
        helpers.make_netns(ns)
    ip = ["ip", "-n", NS]
    subprocess.run(ip + ["link", "add", "out0", "type", "veth", "peer", "name", "out1",
                         "netns", FAR], check=True)
    subprocess.run(["ip", "-n", FAR, "link", "set", "out1", "up"], check=True)
    subprocess.run(ip + ["addr", "add", "10.201.0.1/24", "dev", "out0"], check=True)
    subprocess.run(ip + ["link", "set", "out0", "up"], check=True)
    subprocess.run(["ip", "netns", "exec", NS, "nft", "-f", "-"], check=True, text=True, input=(
        "table inet tgct {\n"
        " chain steer { type nat hook output priority -100;\n"
        f"  meta skuid {helpers.SUBJECT} tcp dport {OUT_PORT} redirect to :{PROXY_PORT}\n }}\n"
        " chain confine { type filter hook output priority 0;\n"
        f"  tcp dport {DROPPED_PORT} drop\n }}\n}}\n"))
    # The proxy's stand-in: a refused flow would leave no entry (conntrack
    # drops an unassured flow at its RST).
    proxy = helpers.start_server(PROXY_PORT, netns=NS)
    yield
    proxy.kill()
    proxy.wait()
    helpers.delete_netns(NS)
    helpers.delete_netns(FAR)


def _held(argv: list[str], port: int) -> tuple[subprocess.Popen, int]:
    p = subprocess.Popen(argv + [sys.executable, "-c", HOLD, OUTSIDE, str(port)],
                         stdout=subprocess.PIPE, text=True)
    return p, json.loads(p.stdout.readline())["sport"]


def test_conntrack_tells_redirected_around_and_dropped_flows_apart(netns):
    as_root = ["ip", "netns", "exec", NS]
    held = [_held(helpers.subject_cmd([], NS), OUT_PORT),   # redirected to PROXY_PORT
            _held(as_root, OUT_PORT),                        # root: not redirected, leaves
            _held(as_root, DROPPED_PORT)]                    # dropped before it could leave
    try:
        asked = [[name, "10.201.0.1", sport, port] for name, (_, sport), port in
                 zip(("redirected", "around", "dropped"), held,
                     (OUT_PORT, OUT_PORT, DROPPED_PORT))]
        r = subprocess.run(as_root + [sys.executable, "-c", LOOKUP, str(ROOT), json.dumps(asked),
                                      OUTSIDE, str(PROXY_PORT)],
                           check=True, capture_output=True, text=True)
    finally:
        for p, _ in held:
            p.kill()
            p.wait()
    flows = json.loads(r.stdout)
    # redirected: the proxy would accept it from loopback's view of the same socket
    assert flows["redirected"] == {"proxied_as": ["10.201.0.1", held[0][1]]}
    assert flows["around"] == {"proxied_as": None}
    assert flows["dropped"] is None
