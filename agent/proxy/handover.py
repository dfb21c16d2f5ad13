"""Live sessions carried across a restart of the agent (an upgrade in place).

Under systemd, a stopping agent does not reset the sessions still open after
proxy.stop_grace_s (an SSH session): the relay threads let go of them
(Pump.close with hand_over), their two sockets go into systemd's file
descriptor store, which keeps them through a restart, and what the relay
held for them (counts, bytes recorded but not yet sent, a direction already
finished) into `handover.json` beside the store. The next agent takes both
and relays the sessions on under the same session ids: the subject and the
destination see one connection, the store one session across two runs.

`systemctl stop` empties the store: the sockets were given SO_LINGER 0
before they went in, so both ends then see a reset, as when the agent
itself reset them. The next start finds their state without their sockets
and writes each one's SESSION_CLOSE, timed at the stop.

An upgrade hands over from the old version to the new: a change to the
state's fields must still read the previous version's `handover.json`.
"""

from __future__ import annotations

import base64
import logging
import os
import socket
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import orjson

from agent import sdnotify
from agent.proxy.server import _LINGER_RST, reset_fd
from agent.proxy.sessions import Session
from agent.store.writer import fsync_dir

log = logging.getLogger("tollgate.proxy")

STATE = "handover.json"
# Room in systemd's store kept for the listening sockets.
_LISTENERS = 32
LIVE, DONE = 0, 2       # a direction's state, as Pump.close gives it
_NO_LINGER = struct.pack("ii", 0, 0)


@dataclass(slots=True)
class Handed:
    """One live session between two agents."""
    session: Session
    client_bytes: int
    server_bytes: int
    pending: tuple[bytes, bytes]      # recorded, not yet sent: to the server, to the client
    states: tuple[int, int]           # LIVE or DONE, per direction
    fds: tuple[int, int] | None = None   # client's socket, server's; None: not kept

    @property
    def sid(self) -> int:
        return self.session.id

    def resume_args(self) -> tuple:
        """Pump.resume's arguments."""
        return (self.sid, *self.fds, self.client_bytes, self.server_bytes, *self.pending,
                *self.states)


def most() -> int:
    """How many sessions a stopping agent can hand to the next one: two
    descriptors each in systemd's store (0: no store, as outside systemd)."""
    return max(0, (sdnotify.store_size() - _LISTENERS) // 2)


def _names(sid: int) -> tuple[str, str]:
    return f"session-{sid}-client", f"session-{sid}-server"


def give(handed: list[Handed], store_dir: str) -> None:
    """Write their state beside the store, then put their sockets in
    systemd's store (each set to reset when systemd closes it). OSError:
    the state could not be written; nothing was given, the sockets are the
    caller's."""
    doc = {"stopped_ns": time.time_ns(), "sessions": [_to_json(h) for h in handed]}
    path = Path(store_dir) / STATE
    tmp = path.with_suffix(".tmp")
    # 0600: the bytes waiting to be sent are recorded payload.
    with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
        f.write(orjson.dumps(doc))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(store_dir)
    for h in handed:
        for name, fd in zip(_names(h.sid), h.fds):
            _linger(fd, _LINGER_RST)
            sdnotify.keep_fd(name, fd)
            os.close(fd)


def take(store_dir: str) -> tuple[list[Handed], int]:
    """What the last agent handed over, each with its sockets if systemd
    kept them (fds None if not), and when it stopped. The state stays until
    forget(): an agent that dies before it has resumed or closed them
    leaves them to the next."""
    path = Path(store_dir) / STATE
    try:
        doc = orjson.loads(path.read_bytes())
        handed = [_from_json(j) for j in doc["sessions"]]
        stopped_ns = int(doc["stopped_ns"])
    except FileNotFoundError:
        return [], 0
    except (OSError, ValueError, KeyError, TypeError) as e:   # the start must not fail on it
        log.error("%s: unreadable, the sessions it held are lost: %s", path, e)
        forget(store_dir)
        return [], 0
    for h in handed:
        socks = [sdnotify.take(name) for name in _names(h.sid)]
        if all(socks):
            h.fds = tuple(s.detach() for s in socks)
            for fd in h.fds:     # no longer reset when closed; the relay never blocks
                _linger(fd, _NO_LINGER)
                os.set_blocking(fd, False)
        else:
            for s in filter(None, socks):
                s.close()
    return handed, stopped_ns


def forget(store_dir: str) -> None:
    """The handed-over sessions are resumed or closed: their state goes."""
    (Path(store_dir) / STATE).unlink(missing_ok=True)
    fsync_dir(store_dir)


def release(handed: list[Handed]) -> None:
    """systemd's copies of the sockets closed: the sessions' ends are ours."""
    for h in handed:
        for name in _names(h.sid):
            sdnotify.release(name)


def reset(h: Handed) -> None:
    """Close its sockets so that both ends see a reset."""
    for fd in h.fds or ():
        reset_fd(fd)
    h.fds = None


def _linger(fd: int, value: bytes) -> None:
    s = socket.socket(fileno=fd)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, value)
    finally:
        s.detach()


def _to_json(h: Handed) -> dict:
    s = h.session
    return {"session": s.id, "client": list(s.client), "original_dst": list(s.original_dst),
            "started_ns": s.started_ns, "client_bytes": h.client_bytes,
            "server_bytes": h.server_bytes, "states": list(h.states),
            "pending": [base64.b64encode(p).decode() for p in h.pending]}


def _from_json(j: dict) -> Handed:
    return Handed(Session(j["session"], tuple(j["client"]), tuple(j["original_dst"]), j["started_ns"]),
                  j["client_bytes"], j["server_bytes"],
                  tuple(base64.b64decode(p) for p in j["pending"]), tuple(j["states"]))
