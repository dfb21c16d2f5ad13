"""The native data plane's Python half: accept, open, connect, hand off.

Python keeps what needs judgement per connection (the original destination,
SESSION_OPEN, policy, naming the process, the upstream connect) and then
gives both sockets to the pump (agent/native/pump.c), whose threads relay
and record every chunk without the GIL. Until the handoff nothing is read
from either socket, so the subject's first bytes wait for attribution in the
kernel's buffer. The pump reports each ended session; SESSION_CLOSE is
written here, after every DATA record of it.

Used with durability "write"; "fsync" needs group commit before each
forward, which the asyncio relay (server.py) does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket

from agent.native import Pump
from agent.proxy.origdst import NotRedirected, original_dst, plain_ip
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
        for _ in range(ACCEPT_BATCH):
            try:
                sock, peer = lsock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:  # EMFILE and the like: the backlog keeps them
                log.warning("accept failed: %s", e.strerror)
                return
            self._accepted(sock, peer)

    def _accepted(self, sock: socket.socket, peer: tuple) -> None:
        proxy = self.proxy
        try:
            dst = original_dst(sock)
        except NotRedirected:
            proxy.stats["not_redirected"] += 1
            sock.close()
            return
        sock.setblocking(False)
        session = proxy.open_session((plain_ip(peer[0]), peer[1]), (plain_ip(dst[0]), dst[1]))
        if session is None:
            reset_socket(sock)
            return
        task = asyncio.get_running_loop().create_task(self._open(sock, session))
        self.opening.add(task)
        task.add_done_callback(self.opening.discard)

    async def _open(self, client: socket.socket, session: Session) -> None:
        """Name the process and connect upstream, side by side; then hand off."""
        proxy = self.proxy
        naming = asyncio.create_task(proxy.attribute(session))
        upstream = None
        try:
            why = proxy.refusal(session.original_dst)
            if why:
                proxy.stats["refused"] += 1
                await naming  # a refusal is evidence too: name the process first
                proxy.hooks.refused(session, why)
                self._fail(client, session, f"refused: {why}")
                return
            try:
                upstream = await self._dial(*session.original_dst)
            except (OSError, TimeoutError) as e:
                proxy.stats["upstream_failed"] += 1
                self._fail(client, session, _why(e) or "timeout")
                return
            await naming
        except asyncio.CancelledError as e:
            naming.cancel()
            if upstream is not None:
                upstream.close()
            reset_socket(client)
            proxy.close_record(session, str(e.args[0]) if e.args else "cancelled", 0, 0)
            return
        try:
            self.pump.add(session.id, client.fileno(), upstream.fileno())
        except (OSError, RuntimeError) as e:  # out of descriptors (each direction dups one)
            upstream.close()
            reset_socket(client)
            self.proxy.close_record(session, f"relay failed: {_why(e)}", 0, 0)
            return
        self.relayed[session.id] = session
        client.detach()  # the pump owns them now
        upstream.detach()

    async def _dial(self, host: str, port: int) -> socket.socket:
        """A non-blocking connect awaited on writability. Not loop.sock_connect:
        uvloop resolves even a numeric address there, in a thread per call."""
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                             socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            # A transparent relay must not add Nagle delay the subject did not ask for.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            err = sock.connect_ex((host, port))
            if err == errno.EINPROGRESS:
                await _writable(sock, self.proxy.connect_timeout_s)
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                raise OSError(err, os.strerror(err))
        except BaseException:
            sock.close()
            raise
        return sock

    def _fail(self, client: socket.socket, session: Session, error: str) -> None:
        reset_socket(client)
        self.proxy.close_record(session, f"upstream failed: {error}", 0, 0)

    # -- ended sessions ----------------------------------------------------------

    def _reap(self) -> None:
        proxy = self.proxy
        for sid, reason, client_bytes, server_bytes, store_errno in self.pump.finished():
            session = self.relayed.pop(sid)
            if store_errno:
                proxy.stats["store_errors"] += 1
                proxy.hooks.store_failed(proxy.store.failed_in_relay(store_errno))
            proxy.close_record(session, reason, client_bytes, server_bytes)


async def _writable(sock: socket.socket, timeout_s: float) -> None:
    """Wait for the connect to finish; TimeoutError after timeout_s. A timer on
    the future, not asyncio.timeout: half the cost, on every connection."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()
    loop.add_writer(sock.fileno(), lambda: ready.done() or ready.set_result(None))
    timer = loop.call_later(timeout_s, lambda: ready.done() or ready.set_exception(TimeoutError()))
    try:
        await ready
    finally:
        timer.cancel()
        loop.remove_writer(sock.fileno())
