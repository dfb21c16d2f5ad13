"""The native data plane's Python half: open, name, hand off what C cannot.

The pump's relay threads accept (agent/native/accept.c: accept4 and the
original destination of each connection). What they cannot open themselves
(below) comes here: Python does what needs judgement per connection
(SESSION_OPEN, naming the process, policy) and then gives the subject's
socket to the pump (agent/native/pump.c), whose threads connect upstream,
then relay and record every chunk without the GIL.
Until the handoff nothing is read from the subject's socket, so its first
bytes wait for attribution in the kernel's buffer; when the witness has
already named the process (nearly always) that all happens in the callback
that takes them, without a task, and SESSION_OPEN and SESSION_INFO are one
write.
The pump reports each ended session; SESSION_CLOSE is written here, after
every DATA record of it.

Once a process is named and a destination judged here, the next connection
of that process to that destination is opened without Python at all (the
native opener, agent/native/opening.c, in the relay thread that accepted
it: the same records, that thread writing SESSION_CLOSE too); only the
connections it cannot open come here (Opener.left). What it needs is taught
after each connection opened here: the process's chain (in the process
table's generation it was built in) and the destination the policy let
through. While the proxy is not accepting (the store fails, or it is
closing) the opener opens nothing.

Used with durability "write"; "fsync" needs group commit before each
forward, which the asyncio relay (server.py) does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from typing import Callable, Protocol

import orjson

from agent.native import KERNEL_PROBE, Opener, Pump
from agent.proxy.handover import Handed
from agent.proxy.server import Proxy, _listening_socket, _why, reset_fd, settled
from agent.proxy.sessions import Session

log = logging.getLogger("tollgate.proxy")


class Generations(Protocol):
    """The witness's process table, as far as naming in C needs it."""
    @property
    def generation(self) -> int: ...
    def on_new_generation(self, listener: Callable[[int], None]) -> None: ...


class Handoff:
    def __init__(self, proxy: Proxy, pump: Pump, opener: Opener) -> None:
        self.proxy, self.pump, self.opener = proxy, pump, opener
        self.procs: Generations | None = None   # set by open_in_c
        proxy.on_accepting(self._accepting)
        self.listeners: list[socket.socket] = []
        self.relayed: dict[int, Session] = {}
        self.opening: set[asyncio.Task] = set()

    async def listen(self, addresses: tuple[str, ...], port: int) -> None:
        loop = asyncio.get_running_loop()
        for addr in addresses:
            sock = _listening_socket(addr, port)
            sock.listen(4096)
            self.listeners.append(sock)
        loop.add_reader(self.opener.left_fd, self._take_left)
        loop.add_reader(self.pump.done_fd, self._reap)
        for sock in self.listeners:
            self.opener.listen(sock.fileno())

    async def close(self, reason: str, hand_over: int = 0) -> list[Handed]:
        """Stop accepting (the backlog waits for the next agent), give what is
        in flight proxy.stop_grace_s to end on its own, then reset the rest,
        each with its SESSION_CLOSE, or return up to hand_over of them
        unended, for the next agent (handover.py)."""
        self.opener.unlisten()
        await settled(lambda: not (self.pump.live or self.opening), self.proxy.stop_grace_s)
        self.proxy.accepting = False
        loop = asyncio.get_running_loop()
        loop.remove_reader(self.opener.left_fd)
        for task in self.opening:
            task.cancel(reason)
        if self.opening:
            await asyncio.wait(set(self.opening))
        # The relay threads accept: the listening sockets close after them.
        live = await asyncio.to_thread(self.pump.close, reason, hand_over > 0)
        for sock in self.listeners:
            sock.close()
        for fd, _, _ in self.opener.left()[0]:
            reset_fd(fd)      # accepted meanwhile, never opened: as the backlog's are
        loop.remove_reader(self.pump.done_fd)
        self._reap()
        return self._handed(live or [], reason, hand_over)

    def _handed(self, live: list[tuple], reason: str, most: int) -> list[Handed]:
        """The pump's live sessions as the next agent takes them; past most,
        or not named, reset and closed here."""
        out, ended = [], []
        for sid, cfd, sfd, cb, sb, cpend, spend, cstate, sstate, opened_ns, addrs in live:
            session = self.relayed.pop(sid, None)
            named = session is not None or addrs is not None
            if session is None:      # opened in C: its addresses are its socket's
                session = Session(sid, *(addrs or (("?", 0), ("?", 0))), opened_ns)
            if len(out) >= most or not named:
                for fd in (cfd, sfd):
                    reset_fd(fd)
                ended.append((session, reason, cb, sb))
                continue
            out.append(Handed(session, cb, sb, (cpend, spend), (cstate, sstate), (cfd, sfd)))
        self.proxy.close_records(ended)
        return out

    def resume(self, handed: list[Handed]) -> list[tuple[Handed, str]]:
        """Relay on the sessions the last agent handed over, with their
        sockets; those the pump refuses returned with why, sockets untouched."""
        left = []
        for h in handed:
            try:
                self.pump.resume(*h.resume_args())
            except (OSError, RuntimeError, ValueError) as e:
                left.append((h, _why(e)))
                continue
            session = h.session
            self.proxy.sessions.add(session)
            self.relayed[h.sid] = session
        return left

    def open_in_c(self, attributed_fd: int, procs: Generations) -> None:
        """Let the opener open sessions whose client the kernel proved (the
        witness's `attributed` map) and whose process procs named."""
        procs.on_new_generation(self.opener.new_generation)
        self.opener.new_generation(procs.generation)
        self.procs = procs
        self.opener.attributed_fd = attributed_fd

    def statistics(self) -> dict:
        c = self.opener.statistics()
        stats = self.proxy.stats
        return {"open": self.pump.live + len(self.opening), "opening": len(self.opening),
                "accepted": stats["accepted"] + c["opened"], "opened_in_c": c["opened"],
                "upstream_failed": stats["upstream_failed"] + c["upstream_failed"]}

    # -- accepting -------------------------------------------------------------

    def _accepting(self, accepting: bool) -> None:
        self.opener.open_here = accepting

    def _take_left(self) -> None:
        # One native call per wake-up for what the relay threads accepted and
        # could not open, without a Python socket object per connection.
        accepted, not_redirected, err = self.opener.left()
        self.proxy.stats["not_redirected"] += not_redirected
        if err:  # EMFILE and the like: the backlog keeps them
            log.warning("accept failed: %s", os.strerror(err))
        for fd, client, dst in accepted:
            self._accepted(fd, client, dst)

    def _accepted(self, fd: int, client: tuple[str, int], dst: tuple[str, int]) -> None:
        proxy = self.proxy
        # Read before naming: a change of the table meanwhile voids the lesson.
        generation = self.procs.generation if self.procs is not None else -1
        # The witness was first (nearly always): SESSION_OPEN and SESSION_INFO
        # in one write, and no task.
        info = proxy.hooks.attribute_now(client, dst)
        session = proxy.open_session(client, dst, info)
        if session is None:
            reset_fd(fd)
            return
        if info is not None:
            if self._relay(fd, session):
                self._teach(info, dst, generation)
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

    def _relay(self, client: int, session: Session) -> bool:
        """Apply policy, then hand the socket to the pump, which connects
        upstream itself (off this thread) and relays. Whether it did."""
        proxy = self.proxy
        why = proxy.refusal(session.original_dst)
        if why:
            proxy.stats["refused"] += 1
            proxy.hooks.refused(session, why)  # named first: a refusal is evidence too
            self._fail(client, session, f"refused: {why}")
            return False
        try:
            self.pump.connect(session.id, client, *session.original_dst)  # the pump owns it now
        except (OSError, RuntimeError, ValueError) as e:
            reset_fd(client)
            proxy.close_record(session, f"relay failed: {_why(e)}", 0, 0)
            return False
        self.relayed[session.id] = session
        return True

    def _teach(self, info: dict, dst: tuple[str, int], generation: int) -> None:
        """What the opener needs to open this process's next connection to
        dst itself: the destination (policy let it through) and, when the
        kernel's event named the process, its chain as of `generation`."""
        self.opener.allow(*dst)
        if generation >= 0 and info.get("probe") == KERNEL_PROBE:
            self.opener.name(info["pid"], orjson.dumps(info["chain"]), generation)

    def _fail(self, client: int, session: Session, error: str) -> None:
        reset_fd(client)
        self.proxy.close_record(session, f"upstream failed: {error}", 0, 0)

    # -- ended sessions ----------------------------------------------------------

    def _reap(self) -> None:
        proxy = self.proxy
        ended = []
        for sid, reason, client_bytes, server_bytes, store_errno in self.pump.finished():
            session = self.relayed.pop(sid, None)   # None: opened in C, which wrote its close
            if reason.startswith("upstream failed") and session is not None:
                proxy.stats["upstream_failed"] += 1
            if store_errno:
                proxy.stats["store_errors"] += 1
                proxy.hooks.store_failed(proxy.store.failed_in_relay(store_errno))
            if session is not None:
                ended.append((session, reason, client_bytes, server_bytes))
        proxy.close_records(ended)
