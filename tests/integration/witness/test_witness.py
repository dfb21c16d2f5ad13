"""The witness against the real kernel, guard on, with a proxy that knows
only what each test tells it (no proxy runs here)."""

from __future__ import annotations

import json
import socket
import subprocess
import time

import pytest

from agent.witness.events import TcpEvent

from . import helpers
from .conftest import running_witness, witness_config

PORT = 18431
BURST_PORT = 18432
MATCH_PORT = 18433
CLOSING_PORT = 18434   # its server closes each connection at once: the client is half-open
PROXY_PORT = witness_config().proxy.port    # no proxy runs: a plain server takes its port
WINDOW_S = witness_config().witness.match_window_ms / 1000
SUBJ_CONNECT = r"""
import json, os, socket, sys
fam = socket.AF_INET6 if ":" in sys.argv[1] else socket.AF_INET
s = socket.socket(fam); s.connect((sys.argv[1], int(sys.argv[2])))
print(json.dumps({"pid": os.getpid(), "sport": s.getsockname()[1]}))
"""


CLOSING_SERVER = r"""
import socket, sys
s = socket.create_server(("127.0.0.1", int(sys.argv[1])))
print("ready", flush=True)
while True:
    s.accept()[0].close()
"""


@pytest.fixture(scope="module")
def server(netns_inode):
    procs = [helpers.start_server(p) for p in (PORT, BURST_PORT, MATCH_PORT, PROXY_PORT)]
    procs.append(helpers.start_server(CLOSING_PORT, code=CLOSING_SERVER))
    yield
    for p in procs:
        p.kill()
        p.wait()


@pytest.fixture(scope="module")
def preexisting(server):
    """A subject connection made before the witness starts: only the sweep sees it."""
    code = ("import socket, sys, time; s = socket.create_connection(('127.0.0.1', %d)); "
            "print(s.getsockname()[1], flush=True); time.sleep(120)" % PORT)
    with helpers.held_subject(code) as p:
        yield p.pid, int(p.stdout.readline())


@pytest.fixture(scope="module")
def preexisting_half_open(server):
    """Made before the witness starts, and its peer has closed (CLOSE_WAIT):
    not ESTABLISHED, yet the subject can still send on it."""
    code = ("import socket, time; s = socket.create_connection(('127.0.0.1', %d)); "
            "assert s.recv(1) == b''; print(s.getsockname()[1], flush=True); "
            "time.sleep(120)" % CLOSING_PORT)
    with helpers.held_subject(code) as p:
        yield int(p.stdout.readline())


@pytest.fixture(scope="module")
def witness(preexisting, preexisting_half_open, store, sessions):
    w = running_witness(witness_config(guard=True, perf_pages=64), store, sessions)
    seen: list = []
    w.subscribe(seen.append)
    w.seen = seen
    yield w
    w.stop()


def test_subject_connect_is_a_bypass_with_evidence(witness, store_dir, netns_inode):
    out = helpers.run_subject(SUBJ_CONNECT, "127.0.0.1", str(PORT))
    a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"])
    ev = a["evidence"]
    assert (ev["dst"], ev["dport"], ev["src"]) == ("127.0.0.1", PORT, "127.0.0.1")
    assert ev["original_destination"] == f"127.0.0.1:{PORT}"
    assert ev["tgid"] == out["pid"] and ev["comm"] == "python3"
    assert ev["uid"] == helpers.ensure_subject().pw_uid
    assert ev["netns_inode"] == netns_inode and ev["cgroup_id"] > 0
    assert ev["probe"] == "tracepoint:sock:inet_sock_set_state"
    assert "ESTABLISHED" in ev["tcp_states"]
    assert ev["process_chain"][0]["pid"] == out["pid"]
    assert ev["process_chain"][0]["argv"][:2] == [helpers.SUBJECT_PYTHON, "-c"]


def test_subject_connect_ipv6(witness, store_dir):
    out = helpers.run_subject(SUBJ_CONNECT, "::1", str(PORT))
    a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"])
    assert a["evidence"]["family"] == "ipv6"
    assert a["evidence"]["original_destination"] == f"[::1]:{PORT}"


def matched_since(witness, before: int, at_least: int, timeout: float) -> int:
    """Connections judged proxied since the count was before, once at least
    at_least of them were (or timeout passed): verdicts come after a window."""
    deadline = time.monotonic() + timeout
    while (n := witness.check.counts["tcp_matched"] - before) < at_least \
            and time.monotonic() < deadline:
        time.sleep(0.02)
    return n


def test_matched_connection_is_no_alert(witness, store_dir, sessions):
    sessions.dst_ports.add(MATCH_PORT)
    before = witness.check.counts["tcp_matched"]
    out = helpers.run_subject(SUBJ_CONNECT, "127.0.0.1", str(MATCH_PORT))
    # Judged once its window has passed: wait for the verdict, then look.
    assert matched_since(witness, before, 1, timeout=10) >= 1
    assert [e for e in witness.seen if isinstance(e, TcpEvent) and e.sport == out["sport"]]
    assert helpers.none_match(store_dir, type="bypass", sport=out["sport"])


def test_root_connection_is_not_reported(witness, store_dir):
    cmd = ["ip", "netns", "exec", helpers.NETNS, helpers.SUBJECT_PYTHON, "-c",
           SUBJ_CONNECT, "127.0.0.1", str(PORT)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    sport = int(out.split('"sport": ')[1].split("}")[0])
    time.sleep(0.6)
    assert not [e for e in witness.seen if isinstance(e, TcpEvent) and e.sport == sport]
    assert helpers.none_match(store_dir, type="bypass", sport=sport)


def test_tcp_fast_open_is_seen(witness, store_dir):
    out = helpers.run_subject(
        "import json, os, socket\ns = socket.socket()\n"
        "s.sendto(b'hello', socket.MSG_FASTOPEN, ('127.0.0.1', %d))\n"
        "print(json.dumps({'pid': os.getpid(), 'sport': s.getsockname()[1]}))" % PORT)
    a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"])
    assert a["evidence"]["tgid"] == out["pid"]


@pytest.mark.parametrize("addr", ["127.0.0.1", "::1"])
def test_udp_datagram_is_udp_blocked(witness, store_dir, addr):
    port = 18440 if ":" not in addr else 18441
    helpers.run_subject(
        "import json, socket, sys\nfam = socket.AF_INET6 if ':' in sys.argv[1] else socket.AF_INET\n"
        "s = socket.socket(fam, socket.SOCK_DGRAM)\ns.sendto(b'q', (sys.argv[1], int(sys.argv[2])))\n"
        "print(json.dumps({}))", addr, str(port))
    a = helpers.wait_alert(store_dir, type="udp_blocked", dport=port)
    assert a["evidence"]["dst"] == addr


def test_dns_udp_is_not_udp_blocked(witness, store_dir):
    helpers.run_subject("import json, socket\ns = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)\n"
                        "s.sendto(b'q', ('127.0.0.1', 53))\nprint(json.dumps({}))")
    time.sleep(0.3)
    assert helpers.none_match(store_dir, type="udp_blocked", dport=53)


@pytest.fixture(scope="module")
def raw_python(tmp_path_factory):
    """A copy of python3 with CAP_NET_RAW in its file capabilities."""
    return helpers.copy_python(tmp_path_factory.mktemp("rawpy"), caps="cap_net_raw+ep")


SOCKET_TRY = r"""
import json, socket, sys
try:
    socket.socket(int(sys.argv[1]), socket.SOCK_RAW, int(sys.argv[2])); err = 0
except OSError as e:
    err = e.errno
print(json.dumps({"errno": err}))
"""


def test_raw_socket_refused_by_guard(witness, store_dir, raw_python):
    out = helpers.run_subject(SOCKET_TRY, str(int(socket.AF_INET)), "1", python=raw_python)
    assert out["errno"] == 1   # EPERM from the cgroup guard
    a = helpers.wait_alert(store_dir, type="raw_socket", socket_family=2)
    assert a["evidence"]["refused"] is True and a["evidence"]["result"] == -1


def test_packet_socket_attempt_is_reported(witness, store_dir, raw_python):
    out = helpers.run_subject(SOCKET_TRY, "17", "0", python=raw_python)
    # No hook on this kernel refuses AF_PACKET (BPF LSM programs do not load): reported.
    assert out["errno"] == 0
    helpers.wait_alert(store_dir, type="raw_socket", socket_family=17)


NETLINK_THEN_UDP = r"""
import json, os, socket
socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 0).close()   # NETLINK_ROUTE, as `ip` does
socket.getaddrinfo("localhost", 80, flags=socket.AI_ADDRCONFIG)  # glibc opens one itself
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.sendto(b"q", ("127.0.0.1", 18442))                           # a marker that is alerted
print(json.dumps({"pid": os.getpid()}))
"""


def test_netlink_sockets_are_no_raw_socket_alert(witness, store_dir):
    """Netlink never leaves the host: `ip`, `ss` and getaddrinfo's own are no alert."""
    out = helpers.run_subject(NETLINK_THEN_UDP)
    # The marker comes after the sockets from the same thread: once it is in, they were judged.
    helpers.wait_alert(store_dir, type="udp_blocked", dport=18442, tgid=out["pid"])
    assert helpers.none_match(store_dir, type="raw_socket", tgid=out["pid"])


def test_unshare_net_is_a_netns_alert(witness, store_dir, netns_inode):
    subprocess.run(helpers.subject_cmd(["unshare", "-rn", "true"]), check=True)
    a = helpers.wait_alert(store_dir, type="netns", comm="unshare")
    assert a["evidence"]["old_netns"] == netns_inode
    assert a["evidence"]["new_netns"] not in (0, netns_inode)


@pytest.fixture(scope="module")
def setuid_python(tmp_path_factory):
    return helpers.copy_python(tmp_path_factory.mktemp("suid"), setuid_root=True)


def test_setuid_helper_stays_a_subject(witness, store_dir, setuid_python):
    code = ("import json, os, socket, sys\nos.setuid(0)\n" + SUBJ_CONNECT.split("\n", 2)[2]
            .replace("json.dumps({", "json.dumps({'uid': os.getuid(), "))
    out = helpers.run_subject(code, "127.0.0.1", str(PORT), python=setuid_python)
    assert out["uid"] == 0
    a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"])
    assert a["evidence"]["uid"] == 0 and a["evidence"]["tgid"] == out["pid"]
    helpers.wait_alert(store_dir, type="uid_change", tgid=out["pid"], syscall=0)
    helpers.wait_alert(store_dir, type="uid_change", tgid=out["pid"], new_uid=0)


ROOT_WEARS_SUBJECT_UID = r"""
import json, os, pwd, socket, sys
subject = pwd.getpwnam(sys.argv[1])
os.setreuid(subject.pw_uid, 0)   # as su, runuser and cron do under PAM
os.setreuid(0, 0)
if os.fork() == 0:               # a marker: the subject proper, sending UDP
    os.setgid(subject.pw_gid)
    os.setuid(subject.pw_uid)
    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"q", ("127.0.0.1", 18443))
    os._exit(0)
os.wait()
print(json.dumps({"pid": os.getpid()}))
"""


def test_root_juggling_a_subjects_uid_is_no_uid_change(witness, store_dir):
    """Root with a subject's real uid for a moment (runuser -u devin, su -
    devin) is not a subject gaining root; the subject proper is still seen."""
    out = subprocess.run(["ip", "netns", "exec", helpers.NETNS, helpers.SUBJECT_PYTHON, "-c",
                          ROOT_WEARS_SUBJECT_UID, helpers.SUBJECT], check=True,
                         capture_output=True, text=True).stdout
    pid = json.loads(out)["pid"]
    helpers.wait_alert(store_dir, type="udp_blocked", dport=18443)
    assert helpers.none_match(store_dir, type="uid_change", tgid=pid)


def test_sweep_finds_socket_opened_before_start(witness, store_dir, preexisting):
    pid, sport = preexisting
    a = helpers.wait_alert(store_dir, type="preexisting_socket", sport=sport)
    assert a["evidence"]["dport"] == PORT and a["evidence"]["probe"] == "sock_diag sweep"


def test_sweep_finds_a_half_open_socket(witness, store_dir, preexisting_half_open):
    a = helpers.wait_alert(store_dir, type="preexisting_socket", sport=preexisting_half_open)
    assert a["evidence"]["dport"] == CLOSING_PORT and a["evidence"]["tcp_state"] == "close_wait"


def test_burst_of_known_connections_has_no_false_bypass(witness, store_dir, sessions):
    sessions.dst_ports.add(BURST_PORT)
    before = witness.check.counts["tcp_matched"]
    code = ("import json, socket, time\nt = time.monotonic()\n"
            "for i in range(2000):\n"
            "    s = socket.create_connection(('127.0.0.1', %d)); s.close()\n"
            "    time.sleep(max(0, t + i * 0.004 - time.monotonic()))\n"
            "print(json.dumps({'s': time.monotonic() - t}))" % BURST_PORT)
    helpers.run_subject(code)
    assert matched_since(witness, before, 2000, timeout=30) == 2000
    assert helpers.none_match(store_dir, type="bypass", dport=BURST_PORT)
    assert witness.statistics()["lost"] == 0


def test_socket_the_proxy_port_accepted_is_proven_in_the_kernel(witness, store_dir, sessions):
    """The session table does not know these; the kernel saw the proxy's port
    accept them on its listen addresses: proven there, so none of their
    events reaches user space (bpf/tcp_connect.c), no bypass, and the proxy
    names the process from the map `attributed`, once."""
    assert PROXY_PORT not in sessions.dst_ports
    before, seen_before = witness.probes.proven(), len(witness.seen)
    outs = {addr: helpers.run_subject(SUBJ_CONNECT, addr, str(PROXY_PORT))
            for addr in ("127.0.0.1", "::1")}
    time.sleep(WINDOW_S + 0.2)   # an unproven socket would have been taken and judged
    assert witness.probes.proven() - before == 2
    for addr, out in outs.items():
        # (earlier tests' sockets may have had the same port: only this test's events)
        assert not [e for e in witness.seen[seen_before:] if isinstance(e, TcpEvent)
                    and e.sport == out["sport"] and e.dport == PROXY_PORT]
        assert helpers.none_match(store_dir, type="bypass", sport=out["sport"])
        ev = witness.probes.attributed(addr, out["sport"])
        assert (ev.tgid, ev.newstate, ev.daddr, ev.dport) == (out["pid"], "ESTABLISHED", addr,
                                                              PROXY_PORT)
        assert witness.probes.attributed(addr, out["sport"]) is None


def test_bypass_still_open_is_taken_from_the_kernel_in_its_window(witness, store_dir):
    """A bypassing socket that stays open never sends its events on its own
    (they wait in the map `pending`): the poll thread takes it once the
    window has passed, and the alert comes while it is still connected."""
    code = SUBJ_CONNECT.replace("sys.argv[2])))", "sys.argv[2]))); sys.stdout.reconfigure("
                                "line_buffering=True)") + "import time; time.sleep(30)\n"
    with helpers.held_subject(code, "127.0.0.1", str(PORT)) as p:
        out = json.loads(p.stdout.readline())
        a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"],
                               tgid=out["pid"])
        assert p.poll() is None            # still connected (for 30 s) when judged
        assert a["evidence"]["tcp_states"] == ["SYN_SENT", "ESTABLISHED"]


def test_proxy_port_on_an_address_not_the_proxys_proves_nothing(witness, store_dir):
    """A listener on the proxy's port at an address the proxy does not listen
    on is not the proxy: the socket stays unproven and is a bypass."""
    server = helpers.start_server(PROXY_PORT, addrs=("127.0.0.2",))
    try:
        before = witness.probes.proven()
        out = helpers.run_subject(SUBJ_CONNECT, "127.0.0.2", str(PROXY_PORT))
        a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"], tgid=out["pid"])
        assert a["evidence"]["tgid"] == out["pid"] and a["evidence"]["dst"] == "127.0.0.2"
        assert witness.probes.proven() == before
    finally:
        server.kill()
        server.wait()


# Two sockets of the subject on one address and port (SO_REUSEADDR).
BOUND = r"""
import json, os, socket, sys, time
def bound(port):
    s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", port)); return s
a = bound(0); port = a.getsockname()[1]
"""
SHARED_PORT = BOUND + r"""
a.connect(("127.0.0.1", int(sys.argv[1])))      # goes around the proxy
b = bound(port); b.connect(("127.0.0.1", int(sys.argv[2])))   # the proxy's port
print(json.dumps({"pid": os.getpid(), "sport": port}), flush=True)
time.sleep(30)
"""


def test_a_second_socket_on_the_same_port_dialing_the_proxy_hides_no_bypass(witness, store_dir):
    """The kernel's proof names the subject's socket by address and port: a
    bypassing socket and a second one bound to the same port (SO_REUSEADDR)
    that dials the proxy's port must not pass for proxied."""
    with helpers.held_subject(SHARED_PORT, str(PORT), str(PROXY_PORT)) as p:
        out = json.loads(p.stdout.readline())
        a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"],
                               tgid=out["pid"], dport=PORT)
        assert a["evidence"]["tgid"] == out["pid"]


SHARED_PORT_LATE = BOUND + r"""
print(json.dumps({"pid": os.getpid(), "sport": port}), flush=True)
sys.stdin.readline()                                  # its SYN is dropped now
a.setblocking(False); a.connect_ex(("127.0.0.1", int(sys.argv[1])))
b = bound(port); b.connect(("127.0.0.1", int(sys.argv[2])))   # proven while a waits
print("b", flush=True)
time.sleep(30)
"""


def test_a_proof_made_while_the_bypass_still_connects_is_not_its_proof(witness, store_dir):
    """The same pair, but the proxy's side proves the second socket while the
    first is still in SYN_SENT: the kernel records which socket it proved,
    so the first is still a bypass."""
    nft = ["ip", "netns", "exec", helpers.NETNS, "nft"]
    with helpers.held_subject(SHARED_PORT_LATE, str(PORT), str(PROXY_PORT), stdin=True) as p:
        try:
            out = json.loads(p.stdout.readline())
            subprocess.run(nft + ["-f", "-"], check=True, text=True, input=(
                "table inet tgwtest {\n chain out {\n type filter hook output priority 0;\n"
                f"  tcp sport {out['sport']} tcp dport {PORT} tcp flags syn drop\n }}\n}}\n"))
            p.stdin.write("go\n")
            p.stdin.flush()
            assert p.stdout.readline().strip() == "b"
            # Judged at its window, still connecting: its SYNs stay dropped
            # until then, however late a loaded machine judges it.
            a = helpers.wait_alert(store_dir, type="bypass", sport=out["sport"],
                                   tgid=out["pid"], dport=PORT)
            assert a["evidence"]["tcp_states"] == ["SYN_SENT"]
            assert a["evidence"]["tgid"] == out["pid"]
        finally:
            subprocess.run(nft + ["delete", "table", "inet", "tgwtest"], capture_output=True)


def test_a_failure_while_judging_is_an_alert_and_the_witness_goes_on(witness, store_dir):
    """A bug reached while judging a socket (here: the kernel record's lookup made
    to raise) used to end the poll thread: every later bypass unseen."""
    def broken(ip, port):
        raise RuntimeError("injected lookup failure")

    real, witness.check.kernel_proxied = witness.check.kernel_proxied, broken
    try:
        helpers.run_subject(SUBJ_CONNECT, "127.0.0.1", str(PORT))
        a = helpers.wait_alert(store_dir, type="witness_error")
    finally:
        witness.check.kernel_proxied = real
    assert "injected lookup failure" in a["evidence"]["error"] and a["severity"] == "critical"
    assert witness.statistics()["errors"] >= 1
    out = helpers.run_subject(SUBJ_CONNECT, "127.0.0.1", str(PORT))
    helpers.wait_alert(store_dir, type="bypass", sport=out["sport"])


def test_statistics_shape(witness):
    st = witness.statistics()
    assert "tracepoint:sock:inet_sock_set_state" in st["attached"]
    assert any(a.startswith("cgroup_inet_sock_create") for a in st["attached"])
    assert st["events"]["TcpEvent"] > 0 and st["alerts"]["bypass"] >= 1
