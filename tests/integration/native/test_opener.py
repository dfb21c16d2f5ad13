"""The native opener (agent/native/opening.c) on the real thing: a network
namespace whose nftables redirect a client (uid 65534) into a listener the
pump's threads accept on, a real BPF hash map standing in for the witness's
`attributed` map, a real store and pump. It opens a session only when
everything Python would judge is already judged (the kernel's event for
that client and destination, a name for its process in the current
generation, a destination let through); otherwise the connection is left
to Python (Opener.left).
"""

from __future__ import annotations

import contextlib
import ctypes as ct
import errno
import json
import os
import select
import socket
import subprocess
import sys
import time
import uuid

import nftables
import pytest
from pyroute2 import IPRoute, netns

from agent.native import KERNEL_PROBE, Opener, Pump
from agent.store import Direction, Kind, StoreWriter, iter_records, verify
from agent.witness import libbpf
from agent.witness.events import _Tcp, peer_key

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

CLIENT_UID = 65534
LISTEN, UPSTREAM, NOBODY_HOME = 18501, 18502, 18503
CHAIN = [{"pid": 4242, "exe": "/usr/bin/psql", "argv": ["psql", "-h", "db"]},
         {"pid": 4000, "exe": "/bin/bash", "argv": ["bash"]}]
# One connection from the client's own port to 127.0.0.1:port, a line up and
# what comes back printed.
CLIENT = """
import socket, sys
s = socket.socket()
s.bind(("127.0.0.1", int(sys.argv[1])))
s.settimeout(10)
s.connect(("127.0.0.1", int(sys.argv[2])))
s.sendall(b"hello from the subject\\n")
s.shutdown(socket.SHUT_WR)
got = b""
try:
    while (chunk := s.recv(65536)):
        got += chunk
except OSError as e:
    print(type(e).__name__)
print(got.decode() or "nothing")
"""


@pytest.fixture
def ns():
    """A fresh namespace, this thread in it: loopback up, the client's
    connections to UPSTREAM and NOBODY_HOME redirected to LISTEN."""
    name = f"tgop{uuid.uuid4().hex[:8]}"
    netns.create(name)
    netns.pushns(name)
    try:
        with IPRoute() as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        rc, _, err = nftables.Nftables().json_cmd({"nftables": [
            {"add": {"table": {"family": "ip", "name": "tgop"}}},
            {"add": {"chain": {"family": "ip", "table": "tgop", "name": "out", "type": "nat",
                               "hook": "output", "prio": -100, "policy": "accept"}}},
            {"add": {"rule": {"family": "ip", "table": "tgop", "chain": "out", "expr": [
                {"match": {"op": "==", "left": {"meta": {"key": "skuid"}}, "right": CLIENT_UID}},
                {"match": {"op": "==", "left": {"payload": {"protocol": "tcp", "field": "dport"}},
                           "right": {"set": [UPSTREAM, NOBODY_HOME]}}},
                {"redirect": {"port": LISTEN}}]}}}]})
        assert rc == 0, err
        yield name
    finally:
        netns.popns()
        netns.remove(name)


class Attributed:
    """A BPF hash map shaped as the witness's `attributed` (tcp_connect.c)."""

    def __init__(self) -> None:
        bpf = libbpf.lib()
        bpf.bpf_map_create.argtypes = [ct.c_int, ct.c_char_p, ct.c_uint32, ct.c_uint32,
                                       ct.c_uint32, ct.c_void_p]
        self.fd = bpf.bpf_map_create(1, b"tg_test_attr", 24, ct.sizeof(_Tcp), 64, None)
        assert self.fd >= 0, os.strerror(ct.get_errno() or 1)

    def put(self, client_port: int, dst_port: int, comm: bytes = b"psql", tgid: int = 4242,
            dst: str = "127.0.0.1") -> None:
        ev = _Tcp()
        ev.h.uid, ev.h.tgid, ev.h.pid, ev.h.comm = CLIENT_UID, tgid, tgid + 1, comm
        ev.h.cgroup_id, ev.h.netns = 77, 4026531840
        ev.family, ev.sport, ev.dport = socket.AF_INET, client_port, dst_port
        ev.oldstate, ev.newstate = 2, 1
        ev.daddr[:4] = socket.inet_aton(dst)
        assert libbpf.lib().bpf_map_update_elem(self.fd, peer_key("127.0.0.1", client_port),
                                                ct.byref(ev), 0) == 0

    def has(self, client_port: int) -> bool:
        ev = _Tcp()
        return libbpf.lib().bpf_map_lookup_elem(
            self.fd, peer_key("127.0.0.1", client_port), ct.byref(ev)) == 0

    def close(self) -> None:
        os.close(self.fd)


class Rig:
    def __init__(self, store) -> None:
        self.writer = StoreWriter(store, immutable=False)
        self.pump = Pump(self.writer.chain, 2, 64 << 10, 5.0)
        self.opener = Opener(self.pump, self.writer.chain, linger_s=0.5, name_ttl_s=30)
        self.attributed = Attributed()
        self.opener.attributed_fd = self.attributed.fd
        self.listener = socket.create_server(("127.0.0.1", LISTEN))
        self.listener.setblocking(False)
        self.opener.listen(self.listener.fileno())
        self.next_port = 40100

    def connect(self, dst_port: int, **event) -> tuple[subprocess.Popen, int]:
        """A client of uid 65534 connecting to dst_port (redirected here),
        its event in the map first (unless event is None)."""
        port, self.next_port = self.next_port, self.next_port + 1
        if event is not None:
            self.attributed.put(port, dst_port, **event)
        client = subprocess.Popen([sys.executable, "-c", CLIENT, str(port), str(dst_port)],
                                  user=CLIENT_UID, stdout=subprocess.PIPE, text=True)
        return client, port

    def left(self, timeout: float = 10) -> list:
        """The connections left to Python, once there are any (else [])."""
        if not select.select([self.opener.left_fd], [], [], timeout)[0]:
            return []
        left, not_redirected, err = self.opener.left()
        assert (not_redirected, err) == (0, 0)
        return left

    def records(self, kind: Kind) -> list[dict]:
        return [json.loads(r.payload) for r in iter_records(self.writer.dir) if r.kind == kind]

    def close(self) -> None:
        self.pump.close("test over")     # the listener outlives the workers (native.h)
        self.listener.close()
        self.attributed.close()
        self.writer.close()


@pytest.fixture
def rig(ns, tmp_path):
    upstream = socket.create_server(("127.0.0.1", UPSTREAM))
    r = Rig(tmp_path / "store")
    r.upstream = upstream
    yield r
    r.close()
    upstream.close()


def serve_one(upstream: socket.socket) -> bytes:
    """The destination: reads the subject's line, answers, closes."""
    upstream.settimeout(10)
    conn, _ = upstream.accept()
    with conn:
        got = b""
        while not got.endswith(b"\n"):
            got += conn.recv(4096)
        conn.sendall(b"hello from the destination\n")
    return got


def teach(rig: Rig, generation: int = 0) -> None:
    rig.opener.new_generation(generation)
    rig.opener.name(4242, json.dumps(CHAIN).encode(), generation)
    rig.opener.allow("127.0.0.1", UPSTREAM)


def test_unnamed_process_is_left_to_python(rig):
    rig.opener.allow("127.0.0.1", UPSTREAM)
    client, port = rig.connect(UPSTREAM, tgid=1234)
    left = rig.left()
    assert [(c, d) for _, c, d in left] == [(("127.0.0.1", port), ("127.0.0.1", UPSTREAM))]
    socket.socket(fileno=left[0][0]).close()
    client.wait(10)
    assert rig.attributed.has(port), "Python's path takes the kernel's event itself"
    assert rig.records(Kind.SESSION_OPEN) == [] and rig.opener.statistics()["opened"] == 0


def test_named_process_to_a_judged_destination_is_opened_relayed_and_closed(rig):
    teach(rig)
    client, port = rig.connect(UPSTREAM)
    assert serve_one(rig.upstream) == b"hello from the subject\n"   # opened in C
    out, _ = client.communicate(timeout=10)
    assert out.strip() == "hello from the destination"
    assert not rig.attributed.has(port), "the event is consumed, as Python's path does"
    deadline = time.monotonic() + 10
    while not rig.records(Kind.SESSION_CLOSE) and time.monotonic() < deadline:
        time.sleep(0.01)

    [opening], [info], [close] = (rig.records(k) for k in
                                  (Kind.SESSION_OPEN, Kind.SESSION_INFO, Kind.SESSION_CLOSE))
    assert list(opening) == ["client", "original_dst", "time_ns"]
    assert opening["client"] == ["127.0.0.1", port]
    assert opening["original_dst"] == ["127.0.0.1", UPSTREAM]
    sid = next(r.seq for r in iter_records(rig.writer.dir) if r.kind == Kind.SESSION_OPEN)
    # What the Python path writes: {"session": sid, **ConnectTable._evidence(event)}.
    assert info == {"session": sid, "uid": CLIENT_UID, "pid": 4242, "tid": 4243,
                    "comm": "psql", "cgroup_id": 77, "netns_inode": 4026531840,
                    "chain": CHAIN, "probe": KERNEL_PROBE}
    assert list(info)[:2] == ["session", "uid"]
    assert close["session"] == sid and close["reason"] == "closed"
    data = [r.data() for r in iter_records(rig.writer.dir) if r.kind == Kind.DATA]
    assert data == [(sid, Direction.CLIENT, b"hello from the subject\n"),
                    (sid, Direction.SERVER, b"hello from the destination\n")]
    assert (close["client_bytes"], close["server_bytes"]) == (23, 27)
    assert rig.pump.finished() == [], "Python hears nothing of a session C closed"
    assert rig.left(timeout=0) == []
    assert verify(rig.writer.dir).ok

    # The cross-check finds it while it lingers, then not.
    assert rig.opener.knows("127.0.0.1", port, "127.0.0.1", UPSTREAM)
    assert rig.opener.knows("::ffff:127.0.0.1", port, "127.0.0.1", UPSTREAM)
    assert not rig.opener.knows("127.0.0.1", port + 1000, "127.0.0.1", UPSTREAM)
    time.sleep(0.6)
    assert not rig.opener.knows("127.0.0.1", port, "127.0.0.1", UPSTREAM)
    st = rig.opener.statistics()
    assert (st["opened"], st["open"], st["upstream_failed"]) == (1, 0, 0)


@pytest.mark.parametrize("why", ["other destination in the event", "destination not judged",
                                 "table changed since the naming", "comm not ASCII",
                                 "not open_here"])
def test_anything_unjudged_is_left_to_python(rig, why):
    teach(rig)
    event: dict = {}
    if why == "other destination in the event":
        event["dst"] = "127.0.0.9"
    elif why == "table changed since the naming":
        rig.opener.new_generation(1)
    elif why == "comm not ASCII":
        event["comm"] = "psql\u00e9".encode()
    # teach() let UPSTREAM through, not NOBODY_HOME.
    dst_port = NOBODY_HOME if why == "destination not judged" else UPSTREAM
    if why == "not open_here":
        rig.opener.open_here = False
    client, port = rig.connect(dst_port, **event)
    left = rig.left()
    assert len(left) == 1 and left[0][1] == ("127.0.0.1", port)
    socket.socket(fileno=left[0][0]).close()
    client.wait(10)
    assert rig.records(Kind.SESSION_OPEN) == []


def test_a_name_from_an_older_generation_is_not_taken(rig):
    rig.opener.new_generation(5)
    rig.opener.name(4242, json.dumps(CHAIN).encode(), 4)
    rig.opener.allow("127.0.0.1", UPSTREAM)
    assert rig.opener.statistics()["names"] == 0
    rig.opener.name(4242, json.dumps(CHAIN).encode(), 5)
    assert rig.opener.statistics()["names"] == 1
    rig.opener.new_generation(6)
    assert rig.opener.statistics()["names"] == 0


def test_refused_upstream_closes_with_the_reason_in_c(rig):
    rig.opener.new_generation(0)
    rig.opener.name(4242, json.dumps(CHAIN).encode(), 0)
    rig.opener.allow("127.0.0.1", NOBODY_HOME)
    client, port = rig.connect(NOBODY_HOME)
    out, _ = client.communicate(timeout=10)
    assert "ConnectionResetError" in out
    deadline = time.monotonic() + 10
    while not rig.records(Kind.SESSION_CLOSE) and time.monotonic() < deadline:
        time.sleep(0.01)
    [close] = rig.records(Kind.SESSION_CLOSE)
    assert close["reason"] == "upstream failed: Connection refused"
    assert (close["client_bytes"], close["server_bytes"]) == (0, 0)
    assert rig.opener.statistics()["upstream_failed"] == 1
    assert rig.pump.finished() == [] and rig.left(timeout=0) == []


def test_a_failing_store_leaves_the_connection_to_python(rig):
    teach(rig)
    rig.writer.healthy = False      # as after a failed append: C must not write around it
    client, port = rig.connect(UPSTREAM)
    left = rig.left()
    assert len(left) == 1 and rig.attributed.has(port)
    socket.socket(fileno=left[0][0]).close()
    client.wait(10)
    rig.writer.healthy = True
    assert rig.records(Kind.SESSION_OPEN) == []



@contextlib.contextmanager
def out_of_descriptors(rig: Rig, client: socket.socket):
    """The process's descriptors used up; the client connects and a relay
    thread's accept4 fails with EMFILE (Python is told). Freed on leaving."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    filler: list[int] = []
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 8, hard))
        with contextlib.suppress(OSError):
            while True:
                filler.append(os.open("/dev/null", os.O_RDONLY))
        client.connect_ex(("127.0.0.1", LISTEN))   # its descriptor was made before
        assert select.select([rig.opener.left_fd], [], [], 10)[0], "Python is not told"
        assert rig.opener.left() == ([], 0, errno.EMFILE)
        yield
    finally:
        for fd in filler:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def nonblocking_client() -> socket.socket:
    client = socket.socket()
    client.setblocking(False)
    return client


def test_out_of_descriptors_pauses_accepting_then_it_resumes(rig):
    """accept4 failing with EMFILE would spin a level-triggered listener:
    the thread leaves it alone for a while, Python hears why, and once
    descriptors are free again the waiting connection is accepted."""
    client = nonblocking_client()
    with out_of_descriptors(rig, client):
        before = time.process_time()       # every thread's; reading /proc needs a descriptor
        time.sleep(1.0)
        assert time.process_time() - before < 0.3, "the relay threads spin on the listener"
    deadline = time.monotonic() + 5
    got: list = []
    while not got and time.monotonic() < deadline:
        if select.select([rig.opener.left_fd], [], [], 0.5)[0]:
            left, skipped, _ = rig.opener.left()
            got = left or ([None] if skipped else [])
    assert got, "the connection was never accepted after the pause"
    for item in got:
        if item is not None:
            socket.socket(fileno=item[0]).close()
    client.close()


def test_a_process_name_made_to_break_json_is_recorded_as_it_is(rig):
    # A subject names its own threads (prctl PR_SET_NAME): quotes, a
    # backslash and control bytes must come out as the same text, not as
    # records a reader cannot parse or that say something else.
    teach(rig)
    comm = b'x","uid":0,"\\\x01\x1f'
    client, port = rig.connect(UPSTREAM, comm=comm)
    serve_one(rig.upstream)
    client.communicate(timeout=10)
    deadline = time.monotonic() + 10
    while not rig.records(Kind.SESSION_CLOSE) and time.monotonic() < deadline:
        time.sleep(0.01)
    [info] = rig.records(Kind.SESSION_INFO)
    assert info["comm"] == comm.decode() and info["uid"] == CLIENT_UID
    assert rig.opener.statistics()["opened"] == 1     # opened in C, not left to Python


def test_after_unlisten_new_connections_wait_in_the_backlog(rig):
    """Stopping: the relay threads take no more connections; they stay in
    the listening socket's backlog for whoever listens next."""
    rig.opener.unlisten()
    client, port = rig.connect(UPSTREAM, tgid=1234)
    assert rig.left(timeout=0.5) == []
    assert select.select([rig.listener], [], [], 5)[0], "not in the backlog"
    conn, peer = rig.listener.accept()
    assert peer == ("127.0.0.1", port)
    conn.close()
    client.wait(10)
    assert rig.opener.statistics()["opened"] == 0


def test_a_listener_paused_for_emfile_is_not_taken_back_after_unlisten(rig):
    """Stopping while accept4 fails: the paused thread must not put the
    listener back into its epoll when the pause ends."""
    client = nonblocking_client()
    with out_of_descriptors(rig, client):
        rig.opener.unlisten()
    time.sleep(0.5)     # five pauses: each paused thread has looked at it again
    assert rig.left(timeout=0.2) == []
    assert select.select([rig.listener], [], [], 5)[0], "not in the backlog"
    rig.listener.accept()[0].close()
    client.close()
    assert rig.opener.statistics()["opened"] == 0
