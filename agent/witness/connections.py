"""Who connected, as the kernel saw it: the witness's ESTABLISHED events for
subject sockets, kept by 4-tuple so the proxy can name the process behind a
session without walking /proc (the pid was captured in process context at
connect time, so even a client that has already exited is named).

A connection the kernel proved went into the proxy sends no event at all:
its ESTABLISHED event waits in the BPF map `attributed` (bpf/tcp_connect.c),
asked first. Otherwise the proxy usually asks a few microseconds before the
event reaches user space, so a question can wait: the poll thread resolves
the asker's future as soon as the event arrives, and the map is looked at
again every few milliseconds meanwhile.
"""

from __future__ import annotations

import asyncio
import threading
from collections import OrderedDict
from collections.abc import Callable

from agent.witness.events import Event, TcpEvent

Key = tuple[str, int, str, int]
KERNEL_RECHECK_S = 0.002
# The evidence's "probe" when the kernel's event named the process; the
# native opener writes the same (agent.native.KERNEL_PROBE, opening.c), and
# the proxy's tests hold the two equal.
KERNEL_PROBE = "ebpf:sock/inet_sock_set_state"


class ConnectTable:
    def __init__(self, procs, capacity: int = 65536,
                 kernel: Callable[[str, int], Event | None] | None = None) -> None:
        # kernel: the event of a socket the kernel proved went into the proxy,
        # which never reaches the ring buffer (Probes.attributed).
        self._procs, self._kernel = procs, kernel
        self._seen: OrderedDict[Key, TcpEvent] = OrderedDict()
        self._waiting: dict[Key, tuple[asyncio.AbstractEventLoop, asyncio.Future]] = {}
        self._lock = threading.Lock()
        self.capacity = capacity
        self.hits = self.misses = 0

    def on_event(self, ev: Event) -> None:
        """Witness listener (poll thread): remember established subject sockets."""
        if (not isinstance(ev, TcpEvent) or ev.newstate != "ESTABLISHED" or not ev.sport
                or ev.oldstate != "SYN_SENT"):  # not the proxy's own accepted side
            return
        key = (ev.saddr, ev.sport, ev.daddr, ev.dport)
        with self._lock:
            waiter = self._waiting.pop(key, None)
            if waiter is None:
                self._seen[key] = ev
                if len(self._seen) > self.capacity:
                    self._seen.popitem(last=False)
        if waiter is not None:
            loop, fut = waiter
            loop.call_soon_threadsafe(_resolve, fut, ev)

    def attribution_now(self, client: tuple[str, int], dst: tuple[str, int]) -> dict | None:
        """The session's evidence if its event has already arrived, else None
        (the proxy then asks attribution(), which waits)."""
        with self._lock:
            ev = self._seen.pop((*client, *dst), None)
        if ev is None:
            ev = self._from_kernel(client, dst)
        if ev is None:
            return None
        self.hits += 1
        return self._evidence(ev)

    def _from_kernel(self, client: tuple[str, int], dst: tuple[str, int]) -> TcpEvent | None:
        ev = self._kernel(*client) if self._kernel is not None else None
        # The map is keyed by the subject's address alone: the destination must agree.
        if isinstance(ev, TcpEvent) and (ev.daddr, ev.dport) == tuple(dst):
            return ev
        return None

    async def attribution(self, client: tuple[str, int], dst: tuple[str, int],
                          wait_s: float) -> dict | None:
        """The session's evidence from the kernel, waiting up to wait_s for
        its event; None if the kernel did not report it in time."""
        found = self.attribution_now(client, dst)
        if found is not None:
            return found
        key = (*client, *dst)
        loop = asyncio.get_running_loop()
        with self._lock:
            ev = self._seen.pop(key, None)
            if ev is None:
                fut = loop.create_future()
                self._waiting[key] = (loop, fut)
        if ev is None:
            ev = await self._wait(fut, loop.time() + wait_s, client, dst)
            with self._lock:
                self._waiting.pop(key, None)
            if ev is None:
                self.misses += 1
                return None
        self.hits += 1
        return self._evidence(ev)

    async def _wait(self, fut: asyncio.Future, deadline: float, client: tuple[str, int],
                    dst: tuple[str, int]) -> TcpEvent | None:
        """The event from the poll thread, or from the kernel's map: the proxy
        may accept a connection a moment before the kernel proves it."""
        loop = asyncio.get_running_loop()
        while (left := deadline - loop.time()) > 0:
            done, _ = await asyncio.wait((fut,), timeout=min(left, KERNEL_RECHECK_S))
            ev = fut.result() if done else self._from_kernel(client, dst)
            if ev is not None:
                return ev
        return None

    def _evidence(self, ev: TcpEvent) -> dict:
        return {"uid": ev.uid, "pid": ev.tgid, "tid": ev.pid, "comm": ev.comm,
                "cgroup_id": ev.cgroup_id, "netns_inode": ev.netns,
                "chain": self._procs.chain(ev.tgid), "probe": KERNEL_PROBE}


def _resolve(fut: asyncio.Future, ev: TcpEvent | None) -> None:
    if not fut.done():
        fut.set_result(ev)
