"""Who connected, as the kernel saw it: the witness's ESTABLISHED events for
subject sockets, kept by 4-tuple so the proxy can name the process behind a
session without walking /proc (the pid was captured in process context at
connect time, so even a client that has already exited is named)."""

from __future__ import annotations

import threading
from collections import OrderedDict

from agent.witness.events import Event, TcpEvent

Key = tuple[str, int, str, int]


class ConnectTable:
    def __init__(self, procs, capacity: int = 65536) -> None:
        self._procs = procs
        self._seen: OrderedDict[Key, TcpEvent] = OrderedDict()
        self._lock = threading.Lock()
        self.capacity = capacity
        self.hits = self.misses = 0

    def on_event(self, ev: Event) -> None:
        """Witness listener (poll thread): remember established subject sockets."""
        if (not isinstance(ev, TcpEvent) or ev.newstate != "ESTABLISHED" or not ev.sport
                or ev.oldstate != "SYN_SENT"):  # not the proxy's own accepted side
            return
        with self._lock:
            self._seen[(ev.saddr, ev.sport, ev.daddr, ev.dport)] = ev
            if len(self._seen) > self.capacity:
                self._seen.popitem(last=False)

    def attribution(self, client: tuple[str, int], dst: tuple[str, int]) -> dict | None:
        """The session's evidence from the kernel, or None if not (yet) seen."""
        with self._lock:
            ev = self._seen.pop((*client, *dst), None)
        if ev is None:
            return None
        chain = self._procs.chain(ev.tgid)
        return {"uid": ev.uid, "pid": ev.tgid, "tid": ev.pid, "comm": ev.comm,
                "cgroup_id": ev.cgroup_id, "netns_inode": ev.netns, "chain": chain,
                "probe": "ebpf:sock/inet_sock_set_state"}
