"""Which process of which user made a connection the proxy accepted.

The subject's socket still exists when the proxy accepts its connection, so
sock_diag (pyroute2) finds it by 4-tuple and gives its uid and inode; the
inode leads to the processes holding it (/proc/<pid>/fd), and psutil gives
each one's exe, argv and parents. This runs in a worker thread: it touches
/proc and must never stall the relay.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import struct
import threading
from typing import Iterable

import psutil
from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req

from agent.proctext import fs_text, read_argv, text
from agent.readcache import READ_TTL_S, ReadCache

ALL_STATES = 0xFFF
NO_COOKIE = 0xFFFFFFFFFFFFFFFF  # INET_DIAG_NOCOOKIE: look the socket up by its tuple
_local = threading.local()
MAX_CHAIN = 16


def find_socket(client: tuple[str, int], dst: tuple[str, int],
                protocol: int = socket.IPPROTO_TCP) -> tuple[int, int] | None:
    """(uid, inode) of the client's socket with this 4-tuple, if it still exists.
    TCP is an exact lookup (one socket, not a dump of thousands); an
    unconnected UDP socket has no peer, so for UDP the local port decides."""
    if protocol == socket.IPPROTO_TCP:
        return _exact_tcp(client, dst)
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    for msg in _diag().get_sock_stats(family=family, protocol=protocol, states=ALL_STATES):
        if msg["idiag_sport"] == client[1]:
            return msg["idiag_uid"], msg["idiag_inode"]
    return None


def _diag() -> DiagSocket:
    """One netlink socket per worker thread, kept: opening one costs 4x a lookup."""
    ds = getattr(_local, "diag", None)
    if ds is None:
        ds = _local.diag = DiagSocket()
        ds.bind()
    return ds


def _words(ip: str) -> tuple[int, int, int, int]:
    return struct.unpack(">4I", ipaddress.ip_address(ip).packed.ljust(16, b"\0"))


def _exact_tcp(client: tuple[str, int], dst: tuple[str, int]) -> tuple[int, int] | None:
    req = inet_diag_req()
    req["sdiag_family"] = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    req["sdiag_protocol"] = socket.IPPROTO_TCP
    req["idiag_states"] = ALL_STATES
    req["idiag_sport"], req["idiag_dport"] = client[1], dst[1]
    req["idiag_src"], req["idiag_dst"] = _words(client[0]), _words(dst[0])
    req["idiag_if"], req["idiag_cookie"] = 0, NO_COOKIE
    try:
        for msg in _diag().nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST):
            return msg["idiag_uid"], msg["idiag_inode"]
    except KeyError:  # the kernel answered with an error: no such socket
        return None
    return None


def pids_holding(inode: int, uid: int) -> list[int]:
    """Processes owned by uid with the socket inode among their open files.
    The processes that held this uid's latest sockets are looked at first (a
    client making many connections is found without walking /proc: one is
    enough then); else every process of the uid. /proc/<pid> is owned by the
    process's effective uid: one stat per process instead of its status."""
    target = f"socket:[{inode}]"
    for pid in _recent.pids(uid):
        if _holds(pid, target):
            _recent.add(uid, pid)
            return [pid]
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            if entry.stat().st_uid == uid and _holds(int(entry.name), target):
                found.append(int(entry.name))
        except OSError:
            continue
    if found:
        _recent.add(uid, found[0])
    return found


def _holds(pid: int, target: str) -> bool:
    fd_dir = f"/proc/{pid}/fd"
    try:
        return any(_readlink(fd_dir, fd) == target for fd in os.listdir(fd_dir))
    except OSError:
        return False


class _Recent:
    """uid -> the pids that held its latest sockets, newest first (a few)."""

    def __init__(self, keep: int = 4) -> None:
        self.keep, self._by_uid, self._lock = keep, {}, threading.Lock()

    def pids(self, uid: int) -> list[int]:
        with self._lock:
            return list(self._by_uid.get(uid, ()))

    def add(self, uid: int, pid: int) -> None:
        with self._lock:
            pids = [pid, *(p for p in self._by_uid.get(uid, ()) if p != pid)]
            self._by_uid[uid] = pids[:self.keep]


_recent = _Recent()


def _readlink(d: str, name: str) -> str:
    try:
        return os.readlink(f"{d}/{name}")
    except OSError:
        return ""


def describe(pid: int) -> dict:
    """exe, argv, uid, cgroup and netns of one process (proctext: bounded, UTF-8)."""
    p = psutil.Process(pid)
    with p.oneshot():
        info = {"pid": pid, "ppid": p.ppid(), "exe": fs_text(_safe(p.exe)), "argv": None,
                "uid": p.uids().real, "euid": p.uids().effective,
                "user": fs_text(_safe(p.username)), "comm": fs_text(p.name())}
    argv = read_argv(pid)
    if argv is not None:
        info.update(argv.evidence())
    info["cgroup"] = _read(f"/proc/{pid}/cgroup").strip()
    try:
        info["netns"] = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        info["netns"] = None
    return info


def chain(pid: int, subject_uids: Iterable[int]) -> list[dict]:
    """The process and its ancestors, up to and including the first one that
    is not the subject's (the login: sshd, sudo, a container runtime...).
    The process itself is read now; its ancestors may come from a read at
    most READ_TTL_S old (as the witness's process table keeps them)."""
    subjects, out = set(subject_uids), []
    while pid > 0 and len(out) < MAX_CHAIN:
        try:
            info = describe(pid) if not out else _ancestors.get(pid, describe)
        except psutil.Error:
            break
        out.append(info)
        if info["uid"] not in subjects and len(out) > 1:
            break
        pid = info["ppid"]
    return out


# describe() of ancestors: a busy client's parents were read again for each connection.
_ancestors: ReadCache[int, dict] = ReadCache(READ_TTL_S, 4096)


def attribute(client: tuple[str, int], dst: tuple[str, int],
              subject_uids: Iterable[int], protocol: int = socket.IPPROTO_TCP) -> dict:
    """Everything we can prove about who made the connection; never raises."""
    try:
        found = find_socket(client, dst, protocol)
    except Exception as e:  # netlink trouble must not cost the session
        return {"error": f"sock_diag: {e}"}
    if found is None:
        return {"error": "client socket already gone"}
    uid, inode = found
    out: dict = {"uid": uid, "inode": inode, "probe": "sock_diag"}
    pids = pids_holding(inode, uid)
    if pids:
        out["pid"] = pids[0]
        out["chain"] = chain(pids[0], subject_uids)
    return out


def _safe(fn):
    try:
        return fn()
    except (psutil.Error, OSError):
        return None


def _read(path: str) -> str:
    try:
        with open(path, "rb") as f:
            return text(f.read())
    except OSError:
        return ""
