"""The asyncio relay (proxy.data_plane "python"): accepts redirected
connections, opens the upstream side, and carries out each session's relay
commands. Proxy also holds what both data planes do per session (open,
refusal, attribution, close records); handoff.py is the native plane's front.

Backpressure is asyncio's own: a side's transport pauses the *other* side's
reading when its write buffer passes the high-water mark, so memory stays
bounded by buffer_bytes per direction whatever the transfer size.

Large chunks are appended in one recorder thread (hashing and the write release
the GIL), so the store works on one core while the loop relays on the other;
a chunk is forwarded only once it is recorded, while its side goes on being
read up to twice buffer_bytes ahead. Small chunks are appended inline (a thread hop
would cost more latency than it saves) unless a chunk of their side is still
in the recorder: then they queue behind it, so order holds.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import socket
import struct
import time
from typing import Awaitable, Callable, Protocol, Sequence

from agent import sdnotify
from agent.proxy.origdst import NotRedirected, original_dst, plain_ip
from agent.proxy.policy import Policy
from agent.proxy.relay import Close, Command, Finish, HalfClose, Record, Relay, Send, Side
from agent.proxy.sessions import Session, SessionTable
from agent.store.format import Kind

log = logging.getLogger("tollgate.proxy")
_LINGER_RST = struct.pack("ii", 1, 0)
# Why a connection is refused while the store cannot take its records.
STORE_FAILING = "agent cannot record (store failing)"
# Chunks at least this big are recorded off the event loop (see above).
OFFLOAD_BYTES = 32 << 10


class Store(Protocol):
    def append_json(self, kind: Kind, obj: dict, ts_ns: int | None = None) -> int: ...
    def append_json_pair(self, kind: Kind, obj: dict, then: Kind,
                         make_then: Callable[[int], dict], ts_ns: int) -> int: ...
    def append_json_many(self, kind: Kind, objs: Sequence[dict],
                         ts_ns: int | None = None) -> None: ...
    def append_data(self, session_id: int, direction, data: bytes) -> int: ...
    def failed_in_relay(self, err: int) -> Exception: ...


class Durable(Protocol):
    async def durable(self, seq: int) -> None: ...


class Hooks(Protocol):
    """What the daemon supplies: who made a connection, and what to do when
    the store fails or policy refuses."""
    def attribute(self, session: Session) -> Awaitable[dict]: ...
    def attribute_now(self, client: tuple[str, int], dst: tuple[str, int]) -> dict | None:
        """What attribute() would give, if known without waiting; else None."""
        ...
    def store_failed(self, error: Exception) -> None: ...
    def refused(self, session: Session, why: str) -> None: ...
    def unrecorded(self, client: tuple[str, int], dst: tuple[str, int],
                   info: dict | None) -> None:
        """A connection refused because the store could not take its opening."""
        ...


class Proxy:
    def __init__(self, *, store: Store, sessions: SessionTable, policy: Policy,
                 hooks: Hooks, buffer_bytes: int, connect_timeout_s: float,
                 stop_grace_s: float, durable: Durable | None = None) -> None:
        # buffer_bytes, connect_timeout_s and stop_grace_s have their defaults
        # in one place: config.ProxyConfig, whose values the daemon passes.
        self.store, self.sessions, self.policy, self.hooks = store, sessions, policy, hooks
        self.durable = durable
        self.buffer_bytes = buffer_bytes
        self.connect_timeout_s = connect_timeout_s
        self.stop_grace_s = stop_grace_s
        self._accepting, self._accepting_listeners = True, []
        self.servers: list[asyncio.base_events.Server] = []
        self.conns: set[Connection] = set()
        # One thread: appends it takes keep their order, as inline ones do.
        self.recorder = concurrent.futures.ThreadPoolExecutor(1, "tollgate-record")
        self.recording: set[asyncio.Future] = set()
        self.stats = {"accepted": 0, "refused": 0, "not_redirected": 0,
                      "upstream_failed": 0, "store_errors": 0}

    @property
    def accepting(self) -> bool:
        """False while new sessions are refused (the store fails; closing)."""
        return self._accepting

    @accepting.setter
    def accepting(self, value: bool) -> None:
        self._accepting = value
        for listener in self._accepting_listeners:
            listener(value)

    def on_accepting(self, listener: Callable[[bool], None]) -> None:
        """listener(accepting) at each change of it."""
        self._accepting_listeners.append(listener)

    async def listen(self, addresses: tuple[str, ...], port: int) -> None:
        loop = asyncio.get_running_loop()
        for addr in addresses:
            sock = _listening_socket(addr, port)
            self.servers.append(await loop.create_server(
                lambda: ClientProtocol(self), sock=sock, backlog=4096))

    async def close(self, reason: str = "agent stopping") -> None:
        for s in self.servers:
            s.close()   # the backlog waits (the socket is kept across a restart)
        await settled(lambda: not self.conns, self.stop_grace_s)
        self.accepting = False
        for c in list(self.conns):
            c.run(c.relay.abort(reason))
        for s in self.servers:
            await s.wait_closed()
        # An append still in the recorder finishes (and its callback runs,
        # registered first) before the daemon may close the store.
        if self.recording:
            await asyncio.wait(set(self.recording))
        self.recorder.shutdown(wait=False)

    def statistics(self) -> dict:
        return {**self.stats, "open": len(self.conns), "accepting": self.accepting}

    # -- what both data planes do per session (handoff.py is the native one's) --

    def open_session(self, client: tuple[str, int], dst: tuple[str, int],
                     info: dict | None = None) -> Session | None:
        """SESSION_OPEN first: a session the store cannot hold is not relayed.
        With info (its process, already known), SESSION_INFO goes in the same
        write and becomes session.info."""
        now = time.time_ns()
        opening = {"client": client, "original_dst": dst, "time_ns": now}
        try:
            if info is None:
                sid = self.store.append_json(Kind.SESSION_OPEN, opening, now)
            else:
                sid = self.store.append_json_pair(
                    Kind.SESSION_OPEN, opening, Kind.SESSION_INFO,
                    lambda sid: {"session": sid, **info}, now)
        except Exception as e:
            self.stats["store_errors"] += 1
            self.hooks.store_failed(e)
            self.hooks.unrecorded(client, dst, info)   # who tried, kept until the store works
            return None
        session = Session(sid, client, dst, now, info=info or {})
        self.sessions.add(session)
        self.stats["accepted"] += 1
        return session

    def refusal(self, dst: tuple[str, int]) -> str | None:
        why = None if self.accepting else STORE_FAILING
        return why or self.policy.refuse(*dst)

    async def attribute(self, session: Session) -> None:
        session.info = await self.hooks.attribute(session)
        try:
            self.store.append_json(Kind.SESSION_INFO, {"session": session.id, **session.info})
        except Exception as e:
            self.hooks.store_failed(e)

    def close_record(self, session: Session, reason: str, client_bytes: int,
                     server_bytes: int) -> None:
        self.close_records(((session, reason, client_bytes, server_bytes),))

    def close_records(self, ended: Sequence[tuple[Session, str, int, int]],
                      ended_ns: int | None = None) -> None:
        """SESSION_CLOSE of each (session, reason, client bytes, server
        bytes), written together: the relay reports ends in batches.
        ended_ns: when they ended, if before now (their duration ends there)."""
        if not ended:
            return
        now = time.time_ns()
        closes = []
        for session, reason, client_bytes, server_bytes in ended:
            self.sessions.close(session)
            closes.append({"session": session.id, "reason": reason,
                           "client_bytes": client_bytes, "server_bytes": server_bytes,
                           "duration_ms": round(((ended_ns or now) - session.started_ns) / 1e6, 3)})
        try:
            self.store.append_json_many(Kind.SESSION_CLOSE, closes, now)
        except Exception as e:
            self.hooks.store_failed(e)


async def settled(done: Callable[[], bool], seconds: float) -> None:
    """Return once done() holds, or after seconds."""
    deadline = time.monotonic() + seconds
    while not done() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


def _listening_socket(addr: str, port: int) -> socket.socket:
    """Bound, not yet listening; kept in systemd's store, or taken back from
    it after a restart (agent/sdnotify.py)."""
    name = sdnotify.listener_name(addr, port)
    sock = sdnotify.take(name) or _bound_socket(addr, port)
    sdnotify.keep(name, sock)
    sock.setblocking(False)
    return sock


def _bound_socket(addr: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted sockets inherit it: the native plane's never pass through _tune.
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if family == socket.AF_INET6:
        # "::" is dual-stack (IPv4 clients arrive v4-mapped); "::1" is v6 only anyway.
        sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if addr == "::" else 1)
    try:
        sock.bind((addr, port))
    except OSError as e:
        sock.close()
        raise OSError(e.errno, f"cannot listen on [{addr}]:{port}: {e.strerror}") from None
    return sock


class Connection:
    """One session: two transports, one relay, the executor of its commands."""

    def __init__(self, proxy: Proxy, client: asyncio.Transport, session: Session) -> None:
        self.proxy, self.session, self.relay = proxy, session, Relay()
        self.transports: list[asyncio.Transport | None] = [client, None]
        # Why each side's reading is paused; it resumes only when none is left.
        # The subject's first bytes wait for attribution too: while its
        # process waits for an answer it is alive, so it can be named.
        self._blocks: list[set[str]] = [{"upstream", "attribution"}, set()]
        # What a side delivered while blocked, in order (bytes, or None for
        # its EOF): a loop may hand over one read it made before the pause.
        self._held: list[list[bytes | None]] = [[], []]
        self._recording = [0, 0]          # bytes of each side in the recorder thread
        self._finished: Finish | None = None  # waits for them, so CLOSE comes last

    def block(self, side: Side, reason: str) -> None:
        t = self.transports[side]
        if not self._blocks[side] and t is not None:
            t.pause_reading()
        self._blocks[side].add(reason)

    def unblock(self, side: Side, reason: str) -> None:
        blocks = self._blocks[side]
        blocks.discard(reason)
        self._replay(side)
        t = self.transports[side]
        if not blocks and t is not None and not self.relay.finished:
            t.resume_reading()

    def _replay(self, side: Side) -> None:
        held = self._held[side]
        while held and not self._blocks[side] and not self.relay.finished:
            if held[0] is None and self._recording[side]:
                return  # the EOF goes after the chunks still being recorded
            item = held.pop(0)
            self.run(self.relay.data_received(side, item) if item is not None
                     else self.relay.eof_received(side))

    # -- events from the transports ------------------------------------------

    def on_data(self, side: Side, data: bytes) -> None:
        if self._blocks[side] or self._held[side]:
            self._held[side].append(data)
            return
        self.run(self.relay.data_received(side, data))

    def on_eof(self, side: Side) -> None:
        if self._blocks[side] or self._held[side] or self._recording[side]:
            self._held[side].append(None)
            return
        self.run(self.relay.eof_received(side))

    def on_lost(self, side: Side, exc: Exception | None) -> None:
        self.transports[side] = None
        self.run(self.relay.connection_lost(side, _why(exc)))

    # -- carrying out commands -------------------------------------------------

    def run(self, cmds: list[Command]) -> None:
        for i, cmd in enumerate(cmds):
            if isinstance(cmd, Record):
                # Behind a chunk in the recorder, even a small one queues there: order.
                if len(cmd.data) >= OFFLOAD_BYTES or self._recording[cmd.direction]:
                    self._record_off_loop(cmd, cmds[i + 1:])
                    return
                seq = self._record(cmd)
                if seq is None:
                    return
                if self.proxy.durable is not None:
                    # Forward only once the batch holding this chunk is on disk.
                    self._defer(seq, Side(cmd.direction), cmds[i + 1:])
                    return
            elif isinstance(cmd, Send):
                t = self.transports[cmd.to]
                if t is None:
                    # The peer has gone: like TCP, answer further data with a reset.
                    self.run(self.relay.abort(f"{cmd.to.name.lower()} gone; data cannot be delivered"))
                    return
                t.write(cmd.data)
            elif isinstance(cmd, HalfClose):
                t = self.transports[cmd.to]
                if t is not None and t.can_write_eof():
                    t.write_eof()
            elif isinstance(cmd, Close):
                self._close(cmd.side, cmd.reset)
            elif isinstance(cmd, Finish):
                self._finish(cmd)

    def _record(self, cmd: Record) -> int | None:
        try:
            seq = self.proxy.store.append_data(self.session.id, cmd.direction, cmd.data)
        except Exception as e:
            self._store_failed(e)
            return None
        self.relay.recorded(Side(cmd.direction), len(cmd.data))
        return seq

    def _store_failed(self, e: BaseException) -> None:
        """A chunk could not be made durable: cut the session (fail closed)."""
        self.proxy.stats["store_errors"] += 1
        self.proxy.hooks.store_failed(e)
        self.run(self.relay.abort(f"store failed: {e}"))

    def _record_off_loop(self, cmd: Record, rest: list[Command]) -> None:
        """Append in the recorder thread; forward (rest) only once it is in.

        The side goes on being read while its earlier chunks are recorded, up
        to twice buffer_bytes in the recorder, so reading, recording and
        sending overlap; in fsync mode one chunk at a time (see _defer).
        """
        src, size = Side(cmd.direction), len(cmd.data)
        limit = 1 if self.proxy.durable is not None else 2 * self.proxy.buffer_bytes
        self._recording[src] += size
        if self._recording[src] >= limit:
            self.block(src, "record")
        fut = asyncio.get_running_loop().run_in_executor(
            self.proxy.recorder, self.proxy.store.append_data, self.session.id,
            cmd.direction, cmd.data)
        self.proxy.recording.add(fut)

        def recorded(f: asyncio.Future) -> None:
            self._recording[src] -= size
            self.proxy.recording.discard(f)
            e = f.exception() if not f.cancelled() else asyncio.CancelledError()
            if e is not None:
                self._store_failed(e)
            else:
                self.relay.recorded(src, size)
                if self.relay.finished:
                    pass  # cut meanwhile: recorded, not forwarded
                elif self.proxy.durable is not None:
                    self._defer(f.result(), src, rest)  # blocks src until durable
                else:
                    self.run(rest)
            self._settled(src, limit)
        fut.add_done_callback(recorded)

    def _settled(self, src: Side, limit: int) -> None:
        """A chunk left the recorder: read on, or write the close record last."""
        if self._recording[src] < limit:
            self.unblock(src, "record")
        if not any(self._recording) and self._finished is not None:
            self._close_record(self._finished)

    def _defer(self, seq: int, src: Side, rest: list[Command]) -> None:
        self.block(src, "durable")

        async def forward() -> None:
            try:
                await self.proxy.durable.durable(seq)
            except Exception as e:
                self._store_failed(e)
                return
            self.run(rest)
            self.unblock(src, "durable")
        asyncio.get_running_loop().create_task(forward())

    def _close(self, side: Side, reset: bool) -> None:
        t = self.transports[side]
        if t is None:
            return
        if reset:
            _reset(t)
        else:
            t.close()

    def _finish(self, f: Finish) -> None:
        self.proxy.conns.discard(self)
        if any(self._recording):
            self._finished = f  # recorded() writes it after the last chunk
            return
        self._close_record(f)

    def _close_record(self, f: Finish) -> None:
        self._finished = None
        self.proxy.close_record(self.session, f.reason, *self.relay.bytes)

    # -- the upstream side -------------------------------------------------------

    async def connect_upstream(self) -> None:
        loop = asyncio.get_running_loop()
        host, port = self.session.original_dst
        try:
            async with asyncio.timeout(self.proxy.connect_timeout_s):
                await loop.create_connection(lambda: ServerProtocol(self), host, port)
        except (OSError, TimeoutError) as e:
            self.proxy.stats["upstream_failed"] += 1
            self.run(self.relay.upstream_failed(_why(e) or "timeout"))
            return
        if self.transports[Side.CLIENT] is None or self.relay.finished:
            self.run(self.relay.abort("client gone before upstream connected"))
            return
        self.unblock(Side.CLIENT, "upstream")

    def upstream_made(self, transport: asyncio.Transport) -> None:
        self.transports[Side.SERVER] = transport
        _tune(transport, self.proxy.buffer_bytes)


class _SideProtocol(asyncio.Protocol):
    side: Side

    def __init__(self) -> None:
        self.conn: Connection | None = None

    def data_received(self, data: bytes) -> None:
        self.conn.on_data(self.side, data)

    def eof_received(self) -> bool:
        self.conn.on_eof(self.side)
        return True  # keep the transport half-open: the other direction goes on

    def connection_lost(self, exc: Exception | None) -> None:
        if self.conn is not None:
            self.conn.on_lost(self.side, exc)

    # Our write buffer to this side is full: stop reading the other side.
    def pause_writing(self) -> None:
        if self.conn is not None:
            self.conn.block(self.side.other, "backpressure")

    def resume_writing(self) -> None:
        if self.conn is not None:
            self.conn.unblock(self.side.other, "backpressure")


class ServerProtocol(_SideProtocol):
    side = Side.SERVER

    def __init__(self, conn: Connection) -> None:
        super().__init__()
        self.conn = conn

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.conn.upstream_made(transport)


class ClientProtocol(_SideProtocol):
    side = Side.CLIENT

    def __init__(self, proxy: Proxy) -> None:
        super().__init__()
        self.proxy = proxy

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # Not read until the upstream side exists. Python 3.11.2's selector
        # transport starts reading *after* connection_made even when paused
        # here, so the pause is made again once that has happened.
        transport.pause_reading()
        if isinstance(transport, asyncio.selector_events._SelectorTransport):
            asyncio.get_running_loop().call_soon(_repause, transport)
        sock = transport.get_extra_info("socket")
        try:
            dst = original_dst(sock)
        except NotRedirected:
            # Not a redirected connection (someone dialled the port directly).
            self.proxy.stats["not_redirected"] += 1
            transport.abort()
            return
        peer = transport.get_extra_info("peername")
        self._open(transport, (plain_ip(peer[0]), peer[1]), (plain_ip(dst[0]), dst[1]))

    def _open(self, transport, client: tuple[str, int], dst: tuple[str, int]) -> None:
        proxy = self.proxy
        session = proxy.open_session(client, dst)
        if session is None:
            _reset(transport)
            return
        conn = self.conn = Connection(proxy, transport, session)
        proxy.conns.add(conn)
        _tune(transport, proxy.buffer_bytes)
        why = proxy.refusal(dst)
        loop = asyncio.get_running_loop()
        if why:
            proxy.stats["refused"] += 1
            loop.create_task(self._refuse(conn, session, why))
            return
        loop.create_task(conn.connect_upstream())
        loop.create_task(self._attribute(session))

    async def _refuse(self, conn: Connection, session: Session, why: str) -> None:
        """Name the process first: a refusal is evidence too (invariant 4)."""
        await self._attribute(session)
        self.proxy.hooks.refused(session, why)
        conn.run(conn.relay.upstream_failed(f"refused: {why}"))

    async def _attribute(self, session: Session) -> None:
        try:
            await self.proxy.attribute(session)
        finally:
            if self.conn is not None:
                self.conn.unblock(Side.CLIENT, "attribution")


def _repause(transport: asyncio.Transport) -> None:
    # Only the stdlib selector transport has the flaw (connection_made checks
    # the type); uvloop honours the pause (a read it made before it is held,
    # see Connection.on_data).
    if not transport.is_closing() and not transport.is_reading():
        transport.resume_reading()
        transport.pause_reading()


def _tune(transport: asyncio.Transport, buffer_bytes: int) -> None:
    transport.set_write_buffer_limits(high=buffer_bytes)
    sock = transport.get_extra_info("socket")
    if sock is not None:
        # A transparent relay must not add Nagle delay the subject did not ask for.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def _reset(transport: asyncio.Transport) -> None:
    sock = transport.get_extra_info("socket")
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    transport.abort()


def reset_socket(sock: socket.socket) -> None:
    """Close so that the peer sees a reset, not a FIN."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    sock.close()


def reset_fd(fd: int) -> None:
    """reset_socket for a bare descriptor (one the pump handed back or never took)."""
    reset_socket(socket.socket(fileno=fd))


def _why(exc: BaseException | None) -> str | None:
    if exc is None:
        return None
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return str(exc) or type(exc).__name__
