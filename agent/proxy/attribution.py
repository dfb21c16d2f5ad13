"""Which process of which user made a connection the proxy accepted.

The subject's socket still exists when the proxy accepts its connection, so
sock_diag (pyroute2) finds it by 4-tuple and gives its uid and inode; the
inode leads to the processes holding it (/proc/<pid>/fd), and psutil gives
each one's exe, argv and parents. This runs in a worker thread: it touches
/proc and must never stall the relay.
"""

from __future__ import annotations

import os
import socket
from typing import Iterable

import psutil
from pyroute2 import DiagSocket

TCP_STATES = (1 << 1) | (1 << 2) | (1 << 3)  # ESTABLISHED, SYN_SENT, SYN_RECV
ALL_STATES = 0xFFF
MAX_CHAIN = 16


def find_socket(client: tuple[str, int], dst: tuple[str, int],
                protocol: int = socket.IPPROTO_TCP) -> tuple[int, int] | None:
    """(uid, inode) of the client's socket with this 4-tuple, if it still exists.
    An unconnected UDP socket has no peer, so for UDP the local end decides."""
    family = socket.AF_INET6 if ":" in client[0] else socket.AF_INET
    udp = protocol == socket.IPPROTO_UDP
    with DiagSocket() as ds:
        ds.bind()
        for msg in ds.get_sock_stats(family=family, protocol=protocol,
                                     states=ALL_STATES if udp else TCP_STATES):
            if msg["idiag_sport"] != client[1]:
                continue
            if udp or (msg["idiag_dport"] == dst[1] and msg["idiag_src"] == client[0]
                       and msg["idiag_dst"] == dst[0]):
                return msg["idiag_uid"], msg["idiag_inode"]
    return None


def pids_holding(inode: int, uid: int) -> list[int]:
    """Processes of uid with the socket inode among their open files."""
    target = f"socket:[{inode}]"
    found = []
    for proc in psutil.process_iter(["uids"]):
        try:
            uids = proc.info["uids"]
            if uids is None or uid not in (uids.real, uids.effective):
                continue
            fd_dir = f"/proc/{proc.pid}/fd"
            if any(_readlink(fd_dir, fd) == target for fd in os.listdir(fd_dir)):
                found.append(proc.pid)
        except (psutil.Error, OSError):
            continue
    return found


def _readlink(d: str, name: str) -> str:
    try:
        return os.readlink(f"{d}/{name}")
    except OSError:
        return ""


def describe(pid: int) -> dict:
    """exe, argv, uid, cgroup and netns of one process."""
    p = psutil.Process(pid)
    with p.oneshot():
        info = {"pid": pid, "ppid": p.ppid(), "exe": _safe(p.exe), "argv": _safe(p.cmdline),
                "uid": p.uids().real, "euid": p.uids().effective, "user": _safe(p.username),
                "comm": p.name()}
    info["cgroup"] = _read(f"/proc/{pid}/cgroup").strip()
    try:
        info["netns"] = os.stat(f"/proc/{pid}/ns/net").st_ino
    except OSError:
        info["netns"] = None
    return info


def chain(pid: int, subject_uids: Iterable[int]) -> list[dict]:
    """The process and its ancestors, up to and including the first one that
    is not the subject's (the login: sshd, sudo, a container runtime...)."""
    subjects, out = set(subject_uids), []
    while pid > 0 and len(out) < MAX_CHAIN:
        try:
            info = describe(pid)
        except psutil.Error:
            break
        out.append(info)
        if info["uid"] not in subjects and len(out) > 1:
            break
        pid = info["ppid"]
    return out


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
        with open(path) as f:
            return f.read()
    except OSError:
        return ""
