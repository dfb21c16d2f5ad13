"""The daemon's control socket: how root's CLI asks the running agent for its
status and for acts that must be recorded by the one store writer (removing
rules, acknowledging alerts, auditing a replay).

Newline-delimited JSON over a Unix stream socket in run_dir, mode 0600, so
only root can connect; the peer's uid (SO_PEERCRED) is recorded as "by".
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pwd
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import orjson

if TYPE_CHECKING:
    from agent.store.writer import StoreSettings

Handler = Callable[[dict, dict], Awaitable[dict] | dict]


class NotRunning(Exception):
    """No agent answers on the control socket."""


def socket_path(run_dir: str) -> Path:
    return Path(run_dir) / "control.sock"


async def serve(run_dir: str, handler: Handler) -> asyncio.base_events.Server:
    path = socket_path(run_dir)
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.unlink(missing_ok=True)
    old = os.umask(0o177)
    try:
        server = await asyncio.start_unix_server(
            lambda r, w: _session(r, w, handler), path=str(path))
    finally:
        os.umask(old)
    return server


async def _session(reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                   handler: Handler) -> None:
    peer = _peer(writer.get_extra_info("socket"))
    try:
        while line := await reader.readline():
            try:
                reply = handler(orjson.loads(line), peer)
                if asyncio.iscoroutine(reply):
                    reply = await reply
            except Exception as e:  # one bad request must not kill the agent
                reply = {"ok": False, "error": str(e)}
            writer.write(orjson.dumps(reply, default=str) + b"\n")
            await writer.drain()
    finally:
        writer.close()


def _peer(sock: socket.socket | None) -> dict:
    if sock is None:
        return {}
    pid, uid, gid = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"pid": pid, "uid": uid, "user": name}


def request(run_dir: str, op: str, timeout: float = 10.0, **args: Any) -> dict:
    """Ask the running agent; raises NotRunning if nobody answers."""
    path = socket_path(run_dir)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(str(path))
    except (FileNotFoundError, ConnectionRefusedError) as e:
        s.close()
        raise NotRunning(f"no agent on {path}") from e
    with s, s.makefile("rwb") as f:
        f.write(orjson.dumps({"op": op, **args}) + b"\n")
        f.flush()
        line = f.readline()
    if not line:
        raise NotRunning("agent closed the control socket")
    return orjson.loads(line)


class StoreLock:
    """One writer per store: the daemon holds this for its life; a CLI that
    must record while the daemon is down takes it too."""

    def __init__(self, store_dir: str) -> None:
        Path(store_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        self.fd = os.open(os.path.join(store_dir, "writer.lock"),
                          os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)

    def acquire(self) -> bool:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False

    def release(self) -> None:
        os.close(self.fd)


def record(run_dir: str, store: StoreSettings, kind: str, rec: dict, by: dict) -> int:
    """Append an ACCESS/ACK/EVENT record: through the running agent if there
    is one (it owns the store), else directly under the writer lock."""
    try:
        reply = request(run_dir, "record", kind=kind, record=rec)
        if not reply.get("ok"):
            raise RuntimeError(reply.get("error"))
        return reply["seq"]
    except NotRunning:
        return append_offline(store, kind, {**rec, "by": by})


def append_offline(store: StoreSettings, kind: str, rec: dict) -> int:
    """Append one record with no agent running, under the writer lock, and
    seal it on close (when the key exists), as the agent would have. The
    record says it was written offline: a killed agent's run must not seem
    to last until the next command an operator ran (review.runs)."""
    from agent.store import Kind, StoreWriter
    lock = StoreLock(store.path)
    try:
        if not lock.acquire():
            raise RuntimeError(f"{store.path}: store is locked by a writer that does not answer")
        w = StoreWriter.from_config(store, maintain_interval_s=0)
        try:
            return w.append_json(Kind[kind], {**rec, "offline": True})
        finally:
            w.close()
    finally:
        lock.release()


def me() -> dict:
    uid = os.getuid()
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = str(uid)
    return {"pid": os.getpid(), "uid": uid, "user": os.environ.get("SUDO_USER") or name}
