"""The deb's unit under a real systemd. This machine has no systemd as PID
1, so a container (systemd-nspawn) boots this machine's own root through an
overlay (writes land in a tmpfs; the host is not changed), with a network
namespace of its own. The package is installed in it as ops would, the
config names a subject, and the container boots: what systemd-analyze
cannot say is proved here. The agent comes up at boot inside its sandbox
(bounded capabilities, seccomp, a read-only system) and records; a stopped
agent leaves the subject refused; a killed one is restarted; an upgrade in
place restarts it; removing the package stops it and leaves the rules.

The container lets through, beyond its own defaults, only the system calls
the unit itself adds to @system-service (bpf, perf_event_open, setns)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

import psutil
import pytest

from .conftest import REPO, UPGRADE_SUFFIX, _preexisting, run

SUBJECT = "nobody"
# A subject listed by uid with no passwd entry at all, as a user only a
# network directory knows looks before the network: confined by number.
DIRECTORY_UID = 4242
PROBE_UIDS = (65534, DIRECTORY_UID)   # SUBJECT's, and that one
SERVER = "10.9.9.1"  # inside the container's own network namespace
# This checkout inside the container (the container's /tmp is its own tmpfs).
CHECKOUT = "/opt/tg-checkout"
# The unit's CapabilityBoundingSet, by number (linux/capability.h).
CAPS = {"CAP_DAC_READ_SEARCH": 2, "CAP_LINUX_IMMUTABLE": 9, "CAP_NET_ADMIN": 12,
        "CAP_SYS_PTRACE": 19, "CAP_SYS_ADMIN": 21, "CAP_SYS_RESOURCE": 24, "CAP_PERFMON": 38,
        "CAP_BPF": 39}

# A subject process that networks as early as any could: as soon as a network
# may exist (after network-pre.target), before tollgate.service starts. Root
# makes an address and listens on it; each subject (one by name, one by a uid
# no user has) connects. Without rules in place it would connect; with them
# it is sent to the proxy's port, where nothing listens yet.
PROBE = """
import os, socket, subprocess
for cmd in ("link add p0 type veth peer name p1", "addr add 10.9.8.1/24 dev p0",
            "link set p0 up", "link set p1 up"):
    subprocess.run(["ip", *cmd.split()], check=True)
server = socket.create_server(("10.9.8.1", 8080))
for uid in UIDS:
    if os.fork() == 0:
        os.setgid(65534)
        os.setuid(uid)
        try:
            socket.create_connection(("10.9.8.1", 8080), timeout=5).close()
            print(f"probe {uid}: connected", flush=True)
        except OSError as e:
            print(f"probe {uid}: {e}", flush=True)
        os._exit(0)
    os.wait()
""".replace("UIDS", repr(PROBE_UIDS))
PROBE_UNIT = """
[Unit]
DefaultDependencies=no
After=network-pre.target local-fs.target
Before=tollgate.service
[Service]
Type=oneshot
RemainAfterExit=yes
ExecStart=/usr/bin/python3 /root/tg-probe.py
"""


class Machine:
    """A booted container; sh() runs a script in all of its namespaces."""

    def __init__(self, root: Path, log: Path) -> None:
        self.root, self.log = root, log
        self.proc: subprocess.Popen | None = None
        self.pid = 0

    def copy_in(self, deb: Path) -> str:
        shutil.copy(deb, self.root / "root" / deb.name)
        return f"/root/{deb.name}"

    def install(self, deb: Path) -> None:
        """dpkg -i and the config, before boot (systemd not running: not started)."""
        inside = self.copy_in(deb)
        (self.root / "etc" / "machine-id").write_text(uuid.uuid4().hex + "\n")
        subjects = f'subjects = ["{SUBJECT}", "{DIRECTORY_UID}"]'
        script = (f"dpkg -i {inside} && ! getent passwd {DIRECTORY_UID} && "
                  f"echo '{subjects}' > /etc/tollgate/tollgate.toml")
        run("systemd-nspawn", "-q", "-D", str(self.root), "--private-network",
            "--register=no", "--keep-unit", "/bin/sh", "-c", script)
        # dev-setup keeps package scripts from starting daemons on this
        # machine; a bastion has no such policy, so neither has the container.
        (self.root / "usr" / "sbin" / "policy-rc.d").unlink(missing_ok=True)

    def quiet_boot(self) -> None:
        """Mask what this machine starts at boot for other tests (its database
        servers, web servers...): only the system, tollgate and the probe."""
        etc = self.root / "etc" / "systemd" / "system"
        for link in (etc / "multi-user.target.wants").iterdir():
            if link.name != "tollgate.service":
                link.unlink()
                (etc / link.name).unlink(missing_ok=True)
                (etc / link.name).symlink_to("/dev/null")
        (self.root / "root" / "tg-probe.py").write_text(PROBE)
        (etc / "tg-probe.service").write_text(PROBE_UNIT)
        (etc / "multi-user.target.wants" / "tg-probe.service").symlink_to(etc / "tg-probe.service")

    def boot(self, timeout: float = 180) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                ["systemd-nspawn", "-D", str(self.root), "-b", "--private-network",
                 "--register=no", "--keep-unit", "--capability=all",
                 "--system-call-filter=bpf perf_event_open setns", "--console=read-only",
                 f"--bind-ro={REPO}:{CHECKOUT}", "-M", "tgunit"],
                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while not self.pid and time.monotonic() < deadline:
            assert self.proc.poll() is None, f"nspawn exited: {self.log.read_text()[-2000:]}"
            kids = psutil.Process(self.proc.pid).children(recursive=True)
            self.pid = next((k.pid for k in kids if k.name() == "systemd"), 0)
            time.sleep(0.2)
        assert self.pid, "no systemd in the container"
        state = self.sh("systemctl is-system-running --wait", check=False, timeout=timeout)
        assert state.stdout.strip() in ("running", "degraded"), self.sh(
            "systemctl --failed --no-pager", check=False).stdout

    def sh(self, script: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return run("nsenter", "-t", str(self.pid), "-a", "/bin/sh", "-c", script, check=check,
                   timeout=timeout)

    def prop(self, name: str) -> str:
        return self.sh(f"systemctl show tollgate -p {name} --value").stdout.strip()

    def wait_until(self, probe, timeout: float = 60, also: str = "true"):
        """probe()'s first true value; past timeout, fails with the agent's
        journal (after what the script `also` prints)."""
        deadline = time.monotonic() + timeout
        while not (got := probe()):
            assert time.monotonic() < deadline, (
                self.sh(also, check=False).stdout + self.journal()[-3000:])
            time.sleep(0.3)
        return got

    def wait_active(self, timeout: float = 60) -> None:
        self.wait_until(lambda: self.prop("ActiveState") == "active", timeout)

    def journal(self) -> str:
        return self.sh("journalctl -u tollgate --no-pager -o cat", check=False).stdout

    def assert_confined(self) -> None:
        """The rules are loaded and the subject's fetch is refused (no agent)."""
        assert self.sh("nft list table inet tollgate").returncode == 0
        r = self.fetch()
        assert r.returncode != 0 and "Connection refused" in r.stderr, r.stdout + r.stderr

    def fetch(self) -> subprocess.CompletedProcess:
        """The subject asks the container's web server for a page."""
        code = (f"import urllib.request; print(urllib.request.urlopen("
                f"'http://{SERVER}:8080/', timeout=5).status)")
        return self.sh(f"runuser -u {SUBJECT} -- python3 -c \"{code}\"", check=False)

    def poweroff(self) -> None:
        if self.proc is None:
            return
        if self.pid:
            self.sh("systemctl poweroff --no-block", check=False)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def machine(debs):
    why = _preexisting()
    if why:
        pytest.skip(f"the container boots this root: {why}")
    base = Path(tempfile.mkdtemp(prefix="tgunit.", dir="/run"))
    run("mount", "-t", "tmpfs", "tmpfs", str(base))
    for d in ("upper", "work", "root"):
        (base / d).mkdir()
    run("mount", "-t", "overlay", "overlay", "-o",
        f"lowerdir=/,upperdir={base}/upper,workdir={base}/work", str(base / "root"))
    m = Machine(base / "root", Path(tempfile.mkstemp(prefix="tgunit-console.")[1]))
    try:
        m.install(debs.first)
        m.quiet_boot()
        m.boot()
        m.sh(f"ip link add v0 type veth peer name v1 && ip addr add {SERVER}/24 dev v0 && "
             "ip link set v0 up && ip link set v1 up && cd /tmp && "
             f"(python3 -m http.server 8080 --bind {SERVER} >/dev/null 2>&1 &) && "
             "for i in $(seq 100); do ss -Hltn 'sport = 8080' | grep -q . && break; sleep 0.1; done")
        yield m
    finally:
        m.poweroff()
        run("umount", "-l", str(base / "root"), check=False)
        run("umount", "-l", str(base), check=False)
        os.rmdir(base)
        m.log.unlink(missing_ok=True)


def test_the_install_enables_the_unit_and_it_comes_up_at_boot(machine):
    assert machine.sh("systemctl is-enabled tollgate").stdout.strip() == "enabled"
    machine.wait_active()
    assert "ready: rules applied" in machine.journal()
    assert machine.prop("NRestarts") == "0", machine.journal()[-3000:]
    assert machine.sh("nft list table inet tollgate").returncode == 0


def test_a_subject_is_refused_from_the_moment_a_network_may_exist(machine):
    """tollgate-rules.service loads the table before network-pre.target: a
    subject that connects before the agent has started is refused, and the
    act is recorded in the store."""
    probe = machine.sh("journalctl -u tg-probe --no-pager -o cat").stdout
    refused = [f"probe {uid}: [Errno 111] Connection refused" for uid in PROBE_UIDS]
    assert all(line in probe for line in refused), probe + machine.sh(
        "systemctl status --no-pager tollgate-rules; journalctl -b -o short-monotonic "
        "--no-pager -u tollgate-rules -u tg-probe -u network-pre.target", check=False).stdout
    ran = int(machine.sh("systemctl show tg-probe -p ExecMainExitTimestampMonotonic --value")
              .stdout)
    agent = int(machine.prop("ExecMainStartTimestampMonotonic"))
    assert 0 < ran < agent
    events = machine.sh(
        "/opt/tollgate/venv/bin/python -c \"from agent.store import Kind, iter_records; "
        "[print(r.payload.decode()) for r in iter_records('/var/lib/tollgate') "
        "if r.kind == Kind.EVENT]\"").stdout
    assert '"reason":"boot: before the network (tollgate-rules.service)"' in events, events


def test_the_agent_runs_inside_the_units_sandbox(machine):
    """Not merely configured: the running process has the bounding set, the
    seccomp filter and no_new_privs the unit asks for."""
    machine.wait_active()
    status = machine.sh(f"cat /proc/{machine.prop('MainPID')}/status").stdout
    field = dict(re.findall(r"^(\w+):\s+(.*)$", status, re.M))
    unit = (REPO / "packaging" / "tollgate.service").read_text()
    named = re.search(r"^CapabilityBoundingSet=(.*)$", unit, re.M).group(1).split()
    assert set(named) == set(CAPS)
    container = int(machine.sh("grep CapBnd /proc/1/status").stdout.split()[1], 16)
    want = sum(1 << CAPS[c] for c in named) & container
    assert int(field["CapBnd"], 16) == want
    assert field["Seccomp"] == "2" and field["NoNewPrivs"] == "1"
    # ProtectSystem=strict: /usr is read-only to the agent.
    mounts = machine.sh(f"cat /proc/{machine.prop('MainPID')}/mountinfo").stdout
    assert re.search(r" /usr \S*ro[, ]", mounts) or re.search(r" / ro[, ]", mounts), mounts


def test_a_subject_connection_is_recorded_by_the_service(machine):
    machine.wait_active()
    r = machine.fetch()
    assert r.stdout.strip() == "200", r.stderr
    listed = json.loads(machine.sh(f"tollgate sessions --dst {SERVER}:8080 --json").stdout)
    assert listed, "no session recorded"
    assert listed[-1]["subject"] == SUBJECT and listed[-1]["protocol"] == "http"
    sid = listed[-1]["id"]
    replay = machine.sh(f"tollgate replay --text {sid}").stdout
    assert "GET / HTTP/1.1" in replay and "200" in replay
    assert machine.sh("tollgate verify").stdout.strip().endswith("OK")
    # The install made the sealing key: nothing says the store is unsealed.
    alerts = json.loads(machine.sh("tollgate alerts --json").stdout)
    assert not [a for a in alerts if a["type"] == "store_unsealed"], alerts


def test_the_service_ships_to_cloud_logging_from_inside_its_sandbox(machine):
    """gRPC out of the sandbox (a fake Cloud Logging in the container, this
    checkout's venv): every record of the store arrives."""
    fake = f"{CHECKOUT}/tests/integration/proxy/fake_logging_main.py"
    machine.sh(f"({CHECKOUT}/.venv/bin/python {fake} /run/fake.port /run/fake.out "
               ">/run/fake.log 2>&1 &)")
    port = machine.wait_until(lambda: machine.sh("cat /run/fake.port", check=False).stdout,
                              30, also="cat /run/fake.log")
    with open(machine.root / "etc" / "tollgate" / "tollgate.toml", "a") as f:
        f.write(f'[ship]\nenabled = true\nproject_id = "p"\nendpoint = "127.0.0.1:{port}"\n'
                'insecure = true\ninstance_id = "1"\nzone = "z"\npoll_interval_s = 0.2\n')
    machine.sh("systemctl restart tollgate")
    assert machine.fetch().stdout.strip() == "200"
    last = int(re.search(r"records 0\.\.(\d+)", machine.sh("tollgate verify").stdout).group(1))

    def shipped() -> bool:
        out = machine.sh("cat /run/fake.out", check=False).stdout
        # insertId is tg-<store id>-<seq>[.<part>]
        seqs = {int(line.split()[0].split(".")[0].rsplit("-", 1)[1]) for line in out.splitlines()}
        return set(range(last + 1)) <= seqs
    machine.wait_until(shipped, 30, also="cat /run/fake.log")


def test_a_stopped_agent_leaves_the_subject_refused_until_started(machine):
    machine.sh("systemctl stop tollgate")
    try:
        machine.assert_confined()
    finally:
        machine.sh("systemctl start tollgate")
    assert machine.fetch().stdout.strip() == "200"


def test_the_early_rules_load_without_the_installs_key_directory(machine):
    """The install's `keys init` may fail (the postinst then says to run it
    later); the early unit must load the rules all the same. A bind mount of
    a missing directory would fail the unit before it ran."""
    machine.sh("systemctl stop tollgate && nft delete table inet tollgate && "
               "mv /var/lib/tollgate-keys /run/keys.away")
    try:
        machine.sh("systemctl restart tollgate-rules")
        machine.assert_confined()
    finally:
        machine.sh("rm -rf /var/lib/tollgate-keys && mv /run/keys.away /var/lib/tollgate-keys && "
                   "systemctl start tollgate", check=False)
    machine.wait_active()
    assert machine.fetch().stdout.strip() == "200"


def test_a_killed_agent_is_restarted(machine):
    machine.wait_active()
    before, restarts = machine.prop("MainPID"), int(machine.prop("NRestarts"))
    machine.sh(f"kill -9 {before}")
    machine.wait_until(lambda: machine.prop("MainPID") not in ("0", before)
                       and machine.prop("ActiveState") == "active", 60)
    assert int(machine.prop("NRestarts")) == restarts + 1
    assert machine.fetch().stdout.strip() == "200"


# A subject fetching a page every 50 ms for argv[1] seconds, counting failures.
FETCH_LOOP = f"""
import sys, time, urllib.request
ok = failed = 0
end = time.monotonic() + float(sys.argv[1])
while time.monotonic() < end:
    try:
        urllib.request.urlopen("http://{SERVER}:8080/", timeout=20).read()
        ok += 1
    except OSError as e:
        failed += 1
        print("failed:", e, flush=True)
    time.sleep(0.05)
print(f"ok {{ok}} failed {{failed}}", flush=True)
"""


def test_a_restart_keeps_the_subjects_connections_waiting_not_refused(machine):
    """systemd keeps the proxy's listening sockets across the restart: a
    subject connecting while no agent runs waits in the backlog and is
    served by the next one (before, refused for a second or two)."""
    machine.wait_active()
    loop = machine.root / "opt" / "tg-fetch-loop.py"
    loop.write_text(FETCH_LOOP)
    loop.chmod(0o644)
    machine.sh(f"(runuser -u {SUBJECT} -- python3 /opt/tg-fetch-loop.py 8 > /run/loop.out 2>&1 &)")
    time.sleep(1.5)
    machine.sh("systemctl restart tollgate")
    out = machine.wait_until(lambda: re.search(
        r"ok (\d+) failed (\d+)", machine.sh("cat /run/loop.out", check=False).stdout), 30)
    assert int(out.group(2)) == 0, machine.sh("cat /run/loop.out").stdout
    assert int(out.group(1)) > 20


# A line echo server (root, in the container), and a subject holding one
# connection to it: a line, then (once /run/tg-chat.go exists) another.
ECHO = f"""
import socketserver
class Echo(socketserver.StreamRequestHandler):
    def handle(self):
        for line in self.rfile:
            if line.startswith(b"big "):      # that many bytes of a known pattern
                block, left = bytes(range(256)) * 256, int(line.split()[1])
                while left:
                    self.wfile.write(block[:left])
                    left -= min(left, len(block))
                continue
            self.wfile.write(b"echo " + line)
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer(("{SERVER}", 7070), Echo).serve_forever()
"""
CHAT = f"""
import os, socket, time
s = socket.create_connection(("{SERVER}", 7070), timeout=30)
def ask(word):
    s.sendall(word.encode() + b"\\n")
    got = b""
    while not got.endswith(b"\\n"):
        chunk = s.recv(100)
        if not chunk:
            raise EOFError("closed")
        got += chunk
    return got.decode().strip()
print("1", ask("before"), flush=True)
while not os.path.exists("/run/tg-chat.go"):
    time.sleep(0.1)
try:
    print("2", ask("after"), flush=True)
except (OSError, EOFError) as e:
    print("2 failed:", type(e).__name__, flush=True)
s.close()
print("done", flush=True)
"""


# The subject downloads BIG bytes, slowly at first (the relay then holds
# bytes it recorded and could not send yet), printing how many and their hash.
BIG = 40_000_000
DOWNLOAD = f"""
import hashlib, socket, time
s = socket.create_connection(("{SERVER}", 7070), timeout=60)
s.sendall(b"big {BIG}\\n")
h, n = hashlib.sha256(), 0
while n < {BIG}:
    chunk = s.recv(65536)
    if not chunk:
        break
    h.update(chunk)
    n += len(chunk)
    if n >= 1 << 20 and n - len(chunk) < 1 << 20:
        print("started", flush=True)
    if n < {BIG} // 2:
        time.sleep(0.01)
print("got", n, h.hexdigest(), flush=True)
"""


def _chat(machine: Machine, out: str) -> str:
    """The subject's connection, open with its first line answered; the
    path of what it prints."""
    for name, text in (("tg-echo.py", ECHO), ("tg-chat.py", CHAT), ("tg-download.py", DOWNLOAD)):
        (machine.root / "opt" / name).write_text(text)
        (machine.root / "opt" / name).chmod(0o644)
    machine.sh("ss -Hltn 'sport = 7070' | grep -q . || (python3 /opt/tg-echo.py >/dev/null 2>&1 &); "
               "for i in $(seq 100); do ss -Hltn 'sport = 7070' | grep -q . && break; sleep 0.1; done; "
               f"rm -f /run/tg-chat.go; (runuser -u {SUBJECT} -- python3 /opt/tg-chat.py > {out} 2>&1 &)")
    machine.wait_until(lambda: "1 echo before" in machine.sh(f"cat {out}", check=False).stdout, 30,
                       also=f"cat {out}")
    return out


def _chat_session(machine: Machine) -> dict:
    listed = json.loads(machine.sh(f"tollgate sessions --dst {SERVER}:7070 --json").stdout)
    return listed[-1]


def test_a_restart_hands_open_sessions_to_the_next_agent(machine):
    """An upgrade restarts the agent; a subject's open connection (an SSH
    session) goes on through the next one, recorded as one session across
    the two runs (before, reset after the stop's grace)."""
    machine.wait_active()
    out = _chat(machine, "/run/chat1.out")
    before = machine.prop("MainPID")
    machine.sh("systemctl restart tollgate")
    machine.wait_until(lambda: machine.prop("MainPID") not in ("0", before)
                       and machine.prop("ActiveState") == "active", 60)
    machine.sh("touch /run/tg-chat.go")
    said = machine.wait_until(lambda: "done" in (o := machine.sh(f"cat {out}").stdout) and o, 30)
    assert "2 echo after" in said, said + machine.journal()[-3000:]
    s = machine.wait_until(lambda: (s := _chat_session(machine))["state"] != "open" and s, 10)
    assert s["state"] == "closed" and (s["client_bytes"], s["server_bytes"]) == (13, 23), s
    replay = machine.sh(f"tollgate replay --text {s['id']}").stdout
    assert (replay.index("before") < replay.index("handed to the next run")
            < replay.index("goes on through this run") < replay.index("echo after")), replay
    # The next agent's witness knew the connection for the proxy's own.
    alerts = json.loads(machine.sh("tollgate alerts --json").stdout)
    assert not [a for a in alerts if a["type"] in ("bypass", "preexisting_socket")], alerts
    status = json.loads(machine.sh("tollgate status --json").stdout)
    assert status["sessions"]["resumed_at_start"] == 1, status["sessions"]
    runs = json.loads(machine.sh("tollgate runs --json").stdout)
    assert runs[-2]["handed_over"] == 1 and "handed to the next run" in runs[-2]["ended"], runs
    assert machine.sh("tollgate verify").stdout.strip().endswith("OK")


def test_a_download_in_flight_arrives_whole_across_a_restart(machine):
    """Bytes the relay had recorded and not yet sent when the agent stopped
    are sent by the next one, once and in order: the subject's download is
    whole, and the store holds exactly it."""
    machine.wait_active()
    _chat(machine, "/run/chat-warm.out")       # the echo server up, as the other tests leave it
    machine.sh(f"(runuser -u {SUBJECT} -- python3 /opt/tg-download.py > /run/download.out 2>&1 &)")
    machine.wait_until(lambda: "started" in machine.sh("cat /run/download.out").stdout, 30,
                       also="cat /run/download.out")
    machine.sh("systemctl restart tollgate")
    said = machine.wait_until(lambda: "got" in (o := machine.sh("cat /run/download.out").stdout)
                              and o, 120, also="cat /run/download.out")
    want = hashlib.sha256((bytes(range(256)) * (BIG // 256 + 1))[:BIG]).hexdigest()
    assert f"got {BIG} {want}" in said, said
    listed = json.loads(machine.sh(f"tollgate sessions --dst {SERVER}:7070 --json").stdout)
    s = next(s for s in reversed(listed) if s["server_bytes"] == BIG)
    assert s["client_bytes"] == len(f"big {BIG}\n"), s
    # The relay held recorded bytes it had not sent: the next run sent them.
    replay = machine.sh(f"tollgate replay --text {s['id']}").stdout
    assert re.search(r"and [1-9]\d* to the client, recorded before the stop", replay), replay[-3000:]
    machine.sh("touch /run/tg-chat.go")        # lets the warm-up connection end


def test_a_stop_resets_what_it_handed_over_and_the_next_start_closes_it(machine):
    """Stopped, not restarted: systemd closes the stored sockets (each set to
    reset first), and the next start writes the session's close."""
    machine.wait_active()
    out = _chat(machine, "/run/chat2.out")
    machine.sh("systemctl stop tollgate")
    try:
        machine.sh("touch /run/tg-chat.go")
        said = machine.wait_until(lambda: "done" in (o := machine.sh(f"cat {out}").stdout) and o, 30)
        assert "2 failed: ConnectionResetError" in said, said
    finally:
        machine.sh("systemctl start tollgate")
    machine.wait_active()
    s = machine.wait_until(lambda: (s := _chat_session(machine))["state"] != "open" and s, 30)
    assert s["state"].startswith("agent stopped: handed over, but the service was stopped"), s
    assert (s["client_bytes"], s["server_bytes"]) == (7, 12), s


def test_an_upgrade_restarts_the_agent_on_the_new_version(machine, debs):
    """Upgraded in place while it runs: postinst restarts it; the store goes
    on across the two versions, the subject's open connection goes on, and
    the subject is served by the new one."""
    machine.wait_active()
    out = _chat(machine, "/run/chat3.out")      # a subject's connection open across it
    before = machine.prop("MainPID")
    machine.sh(f"dpkg -i {machine.copy_in(debs.upgrade)}", timeout=300)
    machine.wait_active()
    machine.sh("touch /run/tg-chat.go")
    said = machine.wait_until(lambda: "done" in (o := machine.sh(f"cat {out}").stdout) and o, 30)
    assert "2 echo after" in said, said
    installed = machine.sh("dpkg-query -W -f '${Version}' tollgate").stdout
    assert installed == debs.version + UPGRADE_SUFFIX
    # A new process, restarted by the upgrade: a restart job zeroes the count
    # of automatic restarts, which a crash would have raised.
    assert machine.prop("MainPID") != before and machine.prop("NRestarts") == "0"
    assert machine.fetch().stdout.strip() == "200"
    assert machine.sh("tollgate verify").stdout.strip().endswith("OK")


def test_remove_stops_the_agent_and_the_rules_stay(machine):
    """Last: the package goes. The agent is stopped, and the subject stays
    refused (fail closed) rather than let through unrecorded."""
    out = machine.sh("dpkg -r tollgate 2>&1").stdout
    assert "rules (table inet tollgate) stay" in out and "policy-rc.d" not in out, out
    assert machine.sh("systemctl show tollgate -p ActiveState --value").stdout.strip() in (
        "inactive", "")
    machine.assert_confined()
