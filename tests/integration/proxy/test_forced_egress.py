"""Issue 2: a subject's connections are forced through the proxy and recorded
byte for byte; root's are not; the agent's death refuses, never leaks."""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys

import pytest

from agent.demo.sandbox import CORP_V4, CORP_V6, wait_for
from agent.review.sessions import list_sessions, session_records
from agent.review.replay import raw_bytes
from agent.store import Direction

from conftest import EXACT_PORT, HALFCLOSE_PORT, PEERS, server_lines


def sessions_to(agent, ip: str, port: int) -> list:
    return [s for s in list_sessions(agent.store) if s.original_dst == (ip, port)]


def payload(agent, session_id: int, direction: Direction) -> bytes:
    return b"".join(raw_bytes(session_records(agent.store, session_id), direction))


def new_session(agent, ip: str, port: int, before: int):
    """The one session to (ip, port) recorded since `before` sessions existed."""
    def closed():
        found = sessions_to(agent, ip, port)[before:]
        return found if found and all(s.close for s in found) else None
    found = wait_for(closed, 10, what=f"a closed session to {ip}:{port}")
    assert len(found) == 1, found
    return found[0]


@pytest.mark.parametrize("host", [CORP_V4, CORP_V6])
def test_psql_query_and_result_are_recorded(agent, sandbox, host):
    before = len(sessions_to(agent, host, 5432))
    r = sandbox.subject_run(["psql", "-h", host, "-U", "postgres", "-d", "corp", "-Atc",
                             "select 42 as answer, name from customers where id = 2"], text=True)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "42|Grace"
    s = new_session(agent, host, 5432, before)
    assert b"select 42 as answer" in payload(agent, s.id, Direction.CLIENT)
    assert b"Grace" in payload(agent, s.id, Direction.SERVER)
    assert s.info["uid"] == sandbox_uid(sandbox)
    assert s.info["chain"][0]["exe"].endswith("psql") or "psql" in s.info["chain"][0]["argv"][0]


def sandbox_uid(sandbox) -> int:
    import pwd
    return pwd.getpwnam(sandbox.subject).pw_uid


@pytest.mark.parametrize("url_host", [CORP_V4, f"[{CORP_V6}]"])
def test_curl_request_and_response_are_recorded(agent, sandbox, servers, url_host):
    ip = url_host.strip("[]")
    before = len(sessions_to(agent, ip, 8080))
    r = sandbox.subject_run(["curl", "-sS", "-g", f"http://{url_host}:8080/hello.txt"])
    assert r.returncode == 0 and r.stdout == servers["http"].BODY
    s = new_session(agent, ip, 8080, before)
    assert payload(agent, s.id, Direction.CLIENT).startswith(b"GET /hello.txt HTTP/1.1\r\n")
    assert payload(agent, s.id, Direction.SERVER).endswith(servers["http"].BODY)
    # The CLI shows the same bytes.
    raw = agent.cli("replay", str(s.id), "--raw", "server").stdout
    assert raw == payload(agent, s.id, Direction.SERVER)


def test_64mib_each_way_is_stored_exactly(agent, sandbox, servers):
    size = 64 << 20
    before = len(sessions_to(agent, CORP_V4, EXACT_PORT))
    lines_before = len(server_lines(servers["exact_out"]))
    r = sandbox.subject_run([sys.executable, PEERS, "client", CORP_V4, str(EXACT_PORT),
                             str(size)], text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    client = json.loads(r.stdout)
    server = wait_for(lambda: server_lines(servers["exact_out"])[lines_before:], 10,
                      what="the server's line")[-1]
    s = new_session(agent, CORP_V4, EXACT_PORT, before)
    up = hashlib.sha256(payload(agent, s.id, Direction.CLIENT)).hexdigest()
    down = hashlib.sha256(payload(agent, s.id, Direction.SERVER)).hexdigest()
    assert client["recv_bytes"] == size and server["recv_bytes"] == size + 8
    assert up == client["sent_sha"] == server["recv_sha"]
    assert down == server["sent_sha"] == client["recv_sha"]
    assert s.bytes == [size + 8, size]


def test_half_close_reply_arrives_whole(agent, sandbox):
    r = sandbox.subject_run([sys.executable, PEERS, "halfclose-client", CORP_V4,
                             str(HALFCLOSE_PORT)], text=True)
    assert r.returncode == 0, r.stderr
    reply = json.loads(r.stdout)
    assert reply["head"].startswith("got 100000 bytes;")
    assert reply["len"] == len("got 100000 bytes;") + (3 << 20)


def test_root_is_not_redirected_but_subject_loopback_is(agent, sandbox, servers):
    loop_port = 8090
    sandbox.spawn(sandbox.bastion, [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                    "--directory", str(servers["http"].dir), str(loop_port)])
    from agent.demo.servers import port_open
    wait_for(lambda: port_open(sandbox, sandbox.bastion, "127.0.0.1", loop_port), 10)
    n_before = len(list_sessions(agent.store))
    r = sandbox.run(sandbox.bastion, ["curl", "-sS", f"http://{CORP_V4}:8080/hello.txt"])
    assert r.returncode == 0
    r = sandbox.run(sandbox.bastion, ["curl", "-sS", f"http://127.0.0.1:{loop_port}/hello.txt"])
    assert r.returncode == 0
    assert len(list_sessions(agent.store)) == n_before  # root: nothing redirected
    r = sandbox.subject_run(["curl", "-sS", f"http://127.0.0.1:{loop_port}/hello.txt"])
    assert r.returncode == 0 and r.stdout == servers["http"].BODY
    new_session(agent, "127.0.0.1", loop_port, 0)


def test_agent_killed_subject_refused_then_recorded_after_restart(agent, sandbox, servers):
    agent.stop(signal.SIGKILL)
    try:
        before = len(sessions_to(agent, CORP_V4, 8080))
        seen = servers["exact_out"].read_text().count("\n")
        probe = ("import socket,struct\ntry:\n s=socket.create_connection(('%s',%d),5)\n"
                 " s.sendall(struct.pack('!Q',0)); s.shutdown(1); s.recv(1); print('through')\n"
                 "except ConnectionRefusedError: print('refused')" % (CORP_V4, EXACT_PORT))
        r = sandbox.subject_run([sys.executable, "-c", probe], text=True)
        assert r.stdout.strip() == "refused", r
        r = sandbox.subject_run(["curl", "-sS", "-m", "5", f"http://{CORP_V4}:8080/hello.txt"])
        assert r.returncode == 7, r  # curl: couldn't connect
        import time
        time.sleep(0.5)
        assert servers["exact_out"].read_text().count("\n") == seen  # never reached corp
        # The rules are still in the kernel, unchanged.
        rules = agent.cli("rules", "show")
        assert rules.returncode == 0, rules.stdout + rules.stderr
    finally:
        agent.start()
    r = sandbox.subject_run(["curl", "-sS", f"http://{CORP_V4}:8080/hello.txt"])
    assert r.returncode == 0
    s = new_session(agent, CORP_V4, 8080, before)
    assert payload(agent, s.id, Direction.SERVER).endswith(servers["http"].BODY)


def test_port_in_use_is_one_clear_line(agent, sandbox, tmp_path):
    """A second agent on the same port: one line, exit 2, no traceback."""
    from agent.demo.agent_process import AgentProcess
    other = AgentProcess(sandbox, workdir=str(tmp_path), port=15001)
    r = other.cli("run", text=True, timeout=60)
    assert r.returncode == 2, r
    assert r.stderr.strip().splitlines()[-1].startswith("tollgate: ")
    assert "proxy.port" in r.stderr and "Address already in use" in r.stderr
    assert "Traceback" not in r.stderr


def test_dual_stack_listener_reads_v4_mapped_original_destination(agent, sandbox, servers,
                                                                    tmp_path):
    """A proxy listening on "::" sees IPv4 clients as ::ffff:a.b.c.d; their
    NAT record is an IPv4 one, and both families are still recorded exactly."""
    from agent.demo.agent_process import AgentProcess
    other = AgentProcess(sandbox, workdir=str(tmp_path), port=15021, listen=("::",),
                         extra="[witness]\nenabled = false\n[dns]\nenabled = false\n")
    # The module's agent steps aside (stopped, its table removed) and comes back after.
    agent.stop()
    sandbox.run(sandbox.bastion, ["nft", "delete", "table", "inet", "tollgate"], check=True)
    other.start()
    try:
        for host in (CORP_V4, f"[{CORP_V6}]"):
            r = sandbox.subject_run(["curl", "-sS", "-g", f"http://{host}:8080/hello.txt"])
            assert r.returncode == 0 and r.stdout == servers["http"].BODY, r
        found = list_sessions(other.store)
        assert {s.original_dst for s in found} == {(CORP_V4, 8080), (CORP_V6, 8080)}
        assert "10.77.0.1" in {s.client[0] for s in found}  # plain IPv4, not ::ffff:10.77.0.1
        # No witness here: each is named from sock_diag and /proc.
        for s in found:
            assert s.info["probe"] == "sock_diag" and s.info["uid"] == sandbox_uid(sandbox), s.info
            assert s.info["chain"][0]["pid"] == s.info["pid"]
            assert s.info["chain"][0]["exe"].endswith("curl"), s.info["chain"]
    finally:
        other.stop()
        subprocess.run(["chattr", "-R", "-i", str(other.store)], capture_output=True)
        agent.start()  # re-applies its own table over the other's


def _their_socket(pid: int, fd: int) -> socket.socket:
    """A copy of another process's socket (pidfd_getfd, root)."""
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(pid)
    try:
        mine = libc.syscall(438, pidfd, fd, 0)  # SYS_pidfd_getfd
        if mine < 0:
            raise OSError(ctypes.get_errno(), "pidfd_getfd")
        return socket.socket(fileno=mine)
    finally:
        os.close(pidfd)


def test_both_sides_of_a_relayed_connection_are_tcp_nodelay(agent, sandbox, servers):
    """A transparent relay adds no Nagle delay the subject did not ask for:
    the agent's socket to the subject and the one to the destination both
    send small writes at once (the subject's side is an accepted socket)."""
    holder = sandbox.spawn(sandbox.bastion, [sys.executable, "-c",
        "import socket, sys, time\n"
        f"s = socket.create_connection(('{CORP_V4}', 8080))\n"
        "print(s.getsockname()[1], flush=True)\n"
        "time.sleep(30)"], user=sandbox.subject, stdout=subprocess.PIPE, text=True)
    try:
        port = int(holder.stdout.readline())
        pid = agent_pid(agent)

        def relayed():
            peers = {}
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if not os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                        continue
                    with _their_socket(pid, int(fd)) as s:   # the agent's netns, not ours
                        if s.type == socket.SOCK_STREAM:
                            peers[s.getpeername()[:2]] = s.getsockopt(
                                socket.IPPROTO_TCP, socket.TCP_NODELAY)
                except OSError:
                    continue   # closed meanwhile, or not connected (a listener)
            client = [v for (ip, p), v in peers.items() if p == port]
            upstream = [v for peer, v in peers.items() if peer == (CORP_V4, 8080)]
            return (client, upstream) if client and upstream else None
        client, upstream = wait_for(relayed, 10, what="the relayed connection's two sockets")
        assert client == [1] and upstream == [1], (client, upstream)
    finally:
        holder.kill()
        holder.wait()


def test_slow_reader_slows_the_writer_and_memory_stays_bounded(agent, sandbox):
    """Backpressure: corp reads nothing for 6 s while the subject floods for
    4 s. What the subject gets to send is bounded by socket buffers plus the
    proxy's per-direction buffer, and the agent's memory does not follow."""
    import psutil
    port = 7004
    sandbox.spawn(sandbox.corp, [sys.executable, PEERS, "stall-server", str(port), "6"])
    from agent.demo.servers import port_open
    wait_for(lambda: port_open(sandbox, sandbox.corp, CORP_V4, port), 10, what="stall server")
    pid = agent_pid(agent)
    rss_before = psutil.Process(pid).memory_info().rss
    r = sandbox.subject_run([sys.executable, PEERS, "flood-client", CORP_V4, str(port), "4"],
                            text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    sent = json.loads(r.stdout)["sent"]
    grown = psutil.Process(pid).memory_info().rss - rss_before
    print(f"sent {sent >> 20} MiB, agent grew {grown >> 20} MiB")
    assert sent < 64 << 20, sent        # unbounded relaying would pass GBs in 4 s
    assert grown < 48 << 20, grown      # the proxy did not buffer what it could not send


def agent_pid(agent) -> int:
    import psutil
    for p in psutil.process_iter(["cmdline"]):
        if str(agent.config) in " ".join(p.info["cmdline"] or []) and "run" in p.info["cmdline"]:
            return p.pid
    raise AssertionError("agent process not found")
