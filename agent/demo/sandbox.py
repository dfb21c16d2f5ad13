"""A throwaway two-host network: `bastion` (where the subject and the agent
run) and `corp` (where the servers are), joined by a veth pair with IPv4 and
IPv6 addresses. Built with pyroute2 in network namespaces of its own, so the
host's network is never touched; the demo and the integration tests share it.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass, field

from pyroute2 import IPRoute, netns

BASTION_V4, CORP_V4 = "10.77.0.1", "10.77.0.2"
BASTION_V6, CORP_V6 = "fd77::1", "fd77::2"


@dataclass
class Sandbox:
    prefix: str = "tgdemo"
    subject: str = "tg-demo"
    procs: list[subprocess.Popen] = field(default_factory=list)
    created_user: bool = False

    @property
    def bastion(self) -> str:
        return f"{self.prefix}-bastion"

    @property
    def corp(self) -> str:
        return f"{self.prefix}-corp"

    # -- building and removing ------------------------------------------------

    def up(self) -> "Sandbox":
        self.down_network()
        for ns in (self.bastion, self.corp):
            netns.create(ns)
        a, b = f"{self.prefix[:8]}-b", f"{self.prefix[:8]}-c"
        # The pair is born in bastion with its peer placed in corp: it never
        # exists in the host's namespace, and nothing has to be moved. (The
        # "veth not found in its namespace" once blamed on moving it was the
        # demo's signal handler in pyroute2's forked helpers: see run.py.)
        with IPRoute(netns=self.bastion) as ip:
            ip.link("add", ifname=a, kind="veth", peer={"ifname": b, "net_ns_fd": self.corp})
        self._address(self.bastion, a, BASTION_V4, BASTION_V6)
        self._address(self.corp, b, CORP_V4, CORP_V6)
        # Every destination routes to corp, so a connect to any address (the
        # metadata server included) reaches the nat hook rather than failing
        # with "network unreachable" before it.
        with IPRoute(netns=self.bastion) as ip:
            ip.route("add", dst="default", gateway=CORP_V4)
            ip.route("add", dst="default", gateway=CORP_V6, family=10)
        self.ensure_user()
        return self

    @staticmethod
    def _address(ns: str, ifname: str, v4: str, v6: str) -> None:
        with IPRoute(netns=ns) as ip:
            lo, dev = ip.link_lookup(ifname="lo")[0], ip.link_lookup(ifname=ifname)[0]
            ip.link("set", index=lo, state="up")
            ip.addr("add", index=dev, address=v4, prefixlen=24)
            # nodad: the address is usable at once, not after duplicate detection.
            ip.addr("add", index=dev, address=v6, prefixlen=64, flags=0x02)
            ip.link("set", index=dev, state="up")

    def ensure_user(self) -> None:
        try:
            pwd.getpwnam(self.subject)
        except KeyError:
            subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                            "/bin/sh", self.subject], check=True)
            self.created_user = True

    def down(self) -> None:
        for p in reversed(self.procs):
            _stop(p)
        self.procs.clear()
        self.down_network()
        if self.created_user:
            subprocess.run(["userdel", self.subject], capture_output=True)
            self.created_user = False

    def down_network(self) -> None:
        for ns in (self.bastion, self.corp):
            if ns in netns.listnetns():
                _kill_netns_processes(ns)
                netns.remove(ns)

    def __enter__(self) -> "Sandbox":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    # -- running things inside ----------------------------------------------------

    def argv(self, ns: str, argv: list[str], user: str | None = None) -> list[str]:
        # nsenter, not `ip netns exec`: the latter remounts /sys, hiding
        # tracefs and BTF from the agent's eBPF witness.
        prefix = ["nsenter", f"--net=/run/netns/{ns}"]
        if user:
            prefix += ["setpriv", f"--reuid={user}", f"--regid={pwd.getpwnam(user).pw_gid}",
                       "--init-groups", "--reset-env"]
        return prefix + argv

    def run(self, ns: str, argv: list[str], user: str | None = None, timeout: float = 60,
            **kw) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        return subprocess.run(self.argv(ns, argv, user), timeout=timeout, **kw)

    def subject_run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        return self.run(self.bastion, argv, user=self.subject, **kw)

    def spawn(self, ns: str, argv: list[str], user: str | None = None,
              **kw) -> subprocess.Popen:
        kw.setdefault("stdout", subprocess.DEVNULL)
        kw.setdefault("stderr", subprocess.DEVNULL)  # an unread pipe would stall a chatty server
        p = subprocess.Popen(self.argv(ns, argv, user), start_new_session=True, **kw)
        self.procs.append(p)
        return p


def _stop(p: subprocess.Popen, timeout: float = 10) -> None:
    if p.poll() is not None:
        return
    try:
        os.killpg(p.pid, signal.SIGTERM)
        p.wait(timeout)
    except (ProcessLookupError, subprocess.TimeoutExpired):
        try:
            os.killpg(p.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        p.wait()


def _kill_netns_processes(ns: str) -> None:
    """Anything still running in the namespace would keep it alive."""
    out = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout
    for pid in out.split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except ProcessLookupError:
            pass
    if out.strip():
        time.sleep(0.1)


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def which(name: str) -> str:
    path = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/lib/postgresql/15/bin")
    if path is None:
        raise RuntimeError(f"{name} is not installed (run `make setup`)")
    return path
