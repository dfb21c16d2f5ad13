"""The native data plane's Python half: accept, open, name, hand off.

Each wake-up of a listening socket is one native call (agent/native/accept.c:
accept4 and the original destination of each connection). Python keeps what
needs judgement per connection (SESSION_OPEN, naming the process, policy) and
then gives the subject's socket to the pump (agent/native/pump.c), whose
threads connect upstream, then relay and record every chunk without the GIL.
Until the handoff nothing is read from the subject's socket, so its first
bytes wait for attribution in the kernel's buffer; when the witness has
already named the process (nearly always) that all happens in the accept
callback, without a task, and SESSION_OPEN and SESSION_INFO are one write.
The pump reports each ended session; SESSION_CLOSE is written here, after
every DATA record of it.

Used with durability "write"; "fsync" needs group commit before each
forward, which the asyncio relay (server.py) does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from agent.native import Pump, accept_redirected
from agent.proxy.server import Proxy, _listening_socket, _why, reset_socket
from agent.proxy.sessions import Session

log = logging.getLogger("tollgate.proxy")
# Accepts per wake-up of a listening socket: others' turn comes after.
ACCEPT_BATCH = 64


class Handoff:
    def __init__(self, proxy: Proxy, pump: Pump) -> None:
        self.proxy, self.pump = proxy, pump
        self.listeners: list[socket.socket] = []
        self.relayed: dict[int, Session] = {}
        self.opening: set[asyncio.Task] = set()

    async def listen(self, addresses: tuple[str, ...], port: int) -> None:
        loop = asyncio.get_running_loop()
        for addr in addresses:
            sock = _listening_socket(addr, port)
            sock.listen(4096)
            self.listeners.append(sock)
            loop.add_reader(sock.fileno(), self._accept, sock)
        loop.add_reader(self.pump.done_fd, self._reap)

    async def close(self, reason: str) -> None:
        """Reset what is relayed or still opening, each with its SESSION_CLOSE."""
        self.proxy.accepting = False
        loop = asyncio.get_running_loop()
        for sock in self.listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        for task in self.opening:
            task.cancel(reason)
        if self.opening:
            await asyncio.wait(set(self.opening))
        await asyncio.to_thread(self.pump.close, reason)
        loop.remove_reader(self.pump.done_fd)
        self._reap()

    def statistics(self) -> dict:
        return {"open": self.pump.live + len(self.opening), "opening": len(self.opening)}

    # -- accepting -------------------------------------------------------------

    def _accept(self, lsock: socket.socket) -> None:
        # One native call per wake-up: accept4 and the original destination of
        # each, without a Python socket object per connection.
        accepted, not_redirected, err = accept_redirected(lsock.fileno(), ACCEPT_BATCH)
        self.proxy.stats["not_redirected"] += not_redirected
        if err:  # EMFILE and the like: the backlog keeps them
            log.warning("accept failed: %s", os.strerror(err))
        for fd, client, dst in accepted:
            self._accepted(fd, client, dst)

    def _accepted(self, fd: int, client: tuple[str, int], dst: tuple[str, int]) -> None:
        proxy = self.proxy
        # The witness was first (nearly always): SESSION_OPEN and SESSION_INFO
        # in one write, and no task.
        info = proxy.hooks.attribute_now(client, dst)
        session = proxy.open_session(client, dst, info)
        if session is None:
            reset_fd(fd)
            return
        if info is not None:
            self._relay(fd, session)
            return
        task = asyncio.get_running_loop().create_task(self._open(fd, session))
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    async def _open(self, client: int, session: Session) -> None:
        """Name the process (waiting for the witness's event or /proc)."""
        try:
            await self.proxy.attribute(session)
        except asyncio.CancelledError as e:
            reset_fd(client)
            self.proxy.close_record(session, str(e.args[0]) if e.args else "cancelled", 0, 0)
            return
        self._relay(client, session)

    def _relay(self, client: int, session: Session) -> None:
        """Apply policy, then hand the socket to the pump, which connects
        upstream itself (off this thread) and relays."""
        proxy = self.proxy
        why = proxy.refusal(session.original_dst)
        if why:
            proxy.stats["refused"] += 1
            proxy.hooks.refused(session, why)  # named first: a refusal is evidence too
            self._fail(client, session, f"refused: {why}")
            return
        try:
            self.pump.connect(session.id, client, *session.original_dst)  # the pump owns it now
        except (OSError, RuntimeError, ValueError) as e:
            reset_fd(client)
            proxy.close_record(session, f"relay failed: {_why(e)}", 0, 0)
            return
        self.relayed[session.id] = session

    def _fail(self, client: int, session: Session, error: str) -> None:
        reset_fd(client)
        self.proxy.close_record(session, f"upstream failed: {error}", 0, 0)

    # -- ended sessions ----------------------------------------------------------

    def _reap(self) -> None:
        proxy = self.proxy
        ended = []
        for sid, reason, client_bytes, server_bytes, store_errno in self.pump.finished():
            if reason.startswith("upstream failed"):
                proxy.stats["upstream_failed"] += 1
            if store_errno:
                proxy.stats["store_errors"] += 1
                proxy.hooks.store_failed(proxy.store.failed_in_relay(store_errno))
            ended.append((self.relayed.pop(sid), reason, client_bytes, server_bytes))
        if ended:
            proxy.close_records(ended)


def reset_fd(fd: int) -> None:
    """Reset an accepted connection the pump never took."""
    reset_socket(socket.socket(fileno=fd))
