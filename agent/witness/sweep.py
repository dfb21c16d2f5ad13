"""The sweep: what the event path cannot see or may have missed.

Every sweep_interval_s, list the connected TCP sockets of every subject
process (sock_diag through pyroute2, in each network namespace a subject
lives in; inode -> process through /proc/<pid>/fd) and ask the proxy about
each one the event path does not already know: every state a payload can
still cross in, not only ESTABLISHED (a socket whose peer has closed,
CLOSE_WAIT, still sends; one that has shut its side, FIN_WAIT*, still
receives). The first sweep finds what was open before the witness started
(`preexisting_socket`); later sweeps find what the events missed (`bypass`,
probe "sock_diag sweep"). Accepted sockets of a subject's own listeners are
inbound, not egress, and skipped.
"""

from __future__ import annotations

import ctypes
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import psutil
from pyroute2 import DiagSocket

from agent.alerts import AlertType
from agent.witness.crosscheck import CrossCheck, matches, tuple_evidence
from agent.witness.events import AF_INET, AF_INET6, Header

PROBE = "sock_diag sweep"
_CLONE_NEWNET = 0x40000000
_LISTEN = 10
# The kernel's TCP states (include/net/tcp_states.h) in which a socket has a
# peer and a payload may cross; SYN_SENT (nothing sent yet but a SYN, which
# the event path judges) and TIME_WAIT (no owner left) are not among them.
CONNECTED = {1: "established", 4: "fin_wait1", 5: "fin_wait2", 8: "close_wait",
             9: "last_ack", 11: "closing"}
_STATES = sum(1 << s for s in (*CONNECTED, _LISTEN))
_libc = ctypes.CDLL(None, use_errno=True)


@dataclass(frozen=True, slots=True)
class DiagSock:
    family: int
    src: str
    sport: int
    dst: str
    dport: int
    inode: int
    cgroup_id: int
    state: str                 # a CONNECTED name


def _diag(family: int) -> tuple[list[DiagSock], set[int]]:
    """(connected sockets, listening ports) of one family in this thread's netns."""
    with DiagSocket() as ds:
        ds.bind()
        msgs = ds.get_sock_stats(family=family, states=_STATES)
    conn, listening = [], set()
    for m in msgs:
        if m["idiag_state"] == _LISTEN:
            listening.add(m["idiag_sport"])
        else:
            cg = dict(m["attrs"]).get("INET_DIAG_CGROUP_ID", 0)
            conn.append(DiagSock(family, m["idiag_src"], m["idiag_sport"], m["idiag_dst"],
                                 m["idiag_dport"], m["idiag_inode"], cg,
                                 CONNECTED[m["idiag_state"]]))
    return conn, listening


def diag_in_netns(pid: int) -> list[DiagSock]:
    """Outbound connected TCP sockets in pid's network namespace.

    setns only moves the calling thread, so a short-lived thread does it and
    the caller's namespace never changes."""
    result: list[DiagSock] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with open(f"/proc/{pid}/ns/net", "rb") as f:
                if _libc.setns(f.fileno(), _CLONE_NEWNET) != 0:
                    raise OSError(ctypes.get_errno(), "setns")
            for fam in (socket.AF_INET, socket.AF_INET6):
                conn, listening = _diag(fam)
                result.extend(s for s in conn if s.sport not in listening)
        except BaseException as e:  # carried to the caller's thread
            errors.append(e)

    t = threading.Thread(target=run, name="tollgate-sweep-netns")
    t.start()
    t.join()
    if errors:
        raise errors[0]
    return result


def socket_inodes(pid: int) -> set[int]:
    inodes = set()
    try:
        for entry in os.scandir(f"/proc/{pid}/fd"):
            try:
                link = os.readlink(entry.path)
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(int(link[8:-1]))
    except OSError:
        pass
    return inodes


def netns_of(pid: int) -> int | None:
    try:
        return os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        return None


class Sweep:
    def __init__(self, check: CrossCheck, subject_uids: Iterable[int],
                 kernel_subjects: Callable[[], set[int]]):
        self.check = check
        self.subject_uids = frozenset(subject_uids)
        self.kernel_subjects = kernel_subjects
        self._alerted: set[tuple[int, int]] = set()   # (netns, inode)
        self.runs = 0
        self.errors = 0

    def subject_pids(self) -> set[int]:
        pids = set(self.kernel_subjects())
        for p in psutil.process_iter(["uids"]):
            uids = p.info["uids"]
            if uids is not None and uids.real in self.subject_uids:
                pids.add(p.pid)
        return pids

    def run_once(self) -> int:
        """One sweep; returns the number of alerts raised."""
        owners: dict[int, dict[int, int]] = {}   # netns -> socket inode -> pid
        for pid in self.subject_pids():
            ns = netns_of(pid)
            if ns is not None:
                owners.setdefault(ns, {}).update(dict.fromkeys(socket_inodes(pid), pid))
        raised = 0
        for ns, inodes in owners.items():
            if not inodes:
                continue
            try:
                socks = diag_in_netns(next(iter(inodes.values())))
            except OSError:
                self.errors += 1     # the process left; the next sweep sees the rest
                continue
            for s in socks:
                if s.inode in inodes and self._suspect(ns, s):
                    self._alert(ns, s, inodes[s.inode], first=self.runs == 0)
                    raised += 1
        self.runs += 1
        return raised

    def _suspect(self, ns: int, s: DiagSock) -> bool:
        t = (s.src, s.sport, s.dst, s.dport)
        return ((ns, s.inode) not in self._alerted and not self.check.known(t)
                and not matches(self.check.sessions, t) and not self.check.redirected(ns, t))

    def _alert(self, ns: int, s: DiagSock, pid: int, first: bool) -> None:
        self._alerted.add((ns, s.inode))
        proc = self.check.procs.get(pid)
        who = Header(ts_ns=time.monotonic_ns(), pid=pid, tgid=pid, uid=proc.uid if proc else -1,
                     cgroup_id=s.cgroup_id, netns=ns, comm=_comm(pid))
        type_ = AlertType.PREEXISTING_SOCKET if first else AlertType.BYPASS
        what = "open before the witness started" if first else "missed by the kernel events"
        t = (s.src, s.sport, s.dst, s.dport)
        fam = AF_INET if s.family == socket.AF_INET else AF_INET6
        self.check.alert(type_, f"{who.comm} (pid {pid}) has a connection to "
                         f"{s.dst}:{s.dport} the proxy does not know ({what})",
                         who, PROBE, **tuple_evidence(fam, t), socket_inode=s.inode,
                         tcp_state=s.state)


def _comm(pid: int) -> str:
    try:
        return psutil.Process(pid).name()
    except psutil.Error:
        return ""
