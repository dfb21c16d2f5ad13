"""systemd's notify protocol without libsystemd: readiness, and the file
descriptor store that keeps the proxy's listening sockets open across a
restart of the unit (an upgrade, a crash). While the agent is down the rules
still send the subjects to the proxy's port; with the socket kept, a subject
connecting meanwhile waits in its backlog and is served by the next agent
instead of being refused. `systemctl stop` empties the store: stopped, the
subjects are refused. The open sessions of a stopping agent wait there too
(agent/proxy/handover.py). Outside systemd every call here does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence

log = logging.getLogger("tollgate.daemon")

_FIRST_FD = 3   # SD_LISTEN_FDS_START
_passed: dict[str, socket.socket] | None = None


def notify(state: str, fds: Sequence[int] = ()) -> None:
    """Send state (and fds) to the service manager, if there is one."""
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return
    if path.startswith("@"):
        path = "\0" + path[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.connect(path)
            socket.send_fds(s, [state.encode()], list(fds))
    except OSError as e:  # a gone supervisor must not take the agent down
        log.warning("sd_notify %s failed: %s", state.split("=")[0], e)


def store_size() -> int:
    """How many descriptors the service manager's store keeps for us: its
    $FDSTORE (systemd 254 on), or the unit's own $TOLLGATE_FDSTORE (the
    same number, for older systemd); 0 without a manager or a store."""
    env = os.environ
    if not env.get("NOTIFY_SOCKET"):
        return 0
    try:
        return int(env.get("FDSTORE") or env.get("TOLLGATE_FDSTORE") or 0)
    except ValueError:
        return 0


def listener_name(addr: str, port: int) -> str:
    """The store's name for a listening socket (no ':', LISTEN_FDNAMES' separator)."""
    return f"tcp-{addr.replace(':', '_')}-{port}"


def take(name: str) -> socket.socket | None:
    """The socket the store gave back under name, once; None if it has none."""
    global _passed
    if _passed is None:
        _passed = _inherited()
    return _passed.pop(name, None)


def keep(name: str, sock: socket.socket) -> None:
    """Store sock under name (systemd ignores a socket it already holds)."""
    keep_fd(name, sock.fileno())


def keep_fd(name: str, fd: int) -> None:
    notify(f"FDSTORE=1\nFDNAME={name}", [fd])


def release(name: str) -> None:
    """Take name out of the store: systemd closes its copy."""
    notify(f"FDSTOREREMOVE=1\nFDNAME={name}")


def drop_unclaimed() -> None:
    """Stored sockets nobody took (the config changed the port or an
    address): closed here and removed from the store."""
    for name, sock in (_passed or {}).items():
        release(name)
        sock.close()
    if _passed:
        _passed.clear()


def _inherited() -> dict[str, socket.socket]:
    env = os.environ
    try:
        ours = int(env.get("LISTEN_PID", "0")) == os.getpid()
        count = int(env.get("LISTEN_FDS", "0")) if ours else 0
    except ValueError:
        count = 0
    names = env.get("LISTEN_FDNAMES", "").split(":")
    for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        env.pop(key, None)
    out = {}
    for i in range(count):
        fd = _FIRST_FD + i
        os.set_inheritable(fd, False)
        out[names[i] if i < len(names) else f"unnamed-{i}"] = socket.socket(fileno=fd)
    return out
