"""The proxy's table of sessions, open and recently closed.

The witness asks it whether a subject socket it saw in the kernel went
through the proxy; closed sessions stay findable for `linger_s` because the
kernel may report a short connection after the proxy has finished it.
Sessions opened in C (agent/native/opening.c) are kept there, asked through
`also`.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

Key = tuple[str, int, str, int]  # client ip, client port, original dst ip, port


@dataclass(slots=True)
class Session:
    id: int
    client: tuple[str, int]
    original_dst: tuple[str, int]
    started_ns: int
    closed_ns: int | None = None
    info: dict = field(default_factory=dict)

    @property
    def key(self) -> Key:
        return (*self.client, *self.original_dst)


class SessionTable:
    def __init__(self, linger_s: float = 30.0) -> None:
        self._open: dict[Key, Session] = {}
        # Closed sessions by key -> when they closed. Only the key is asked
        # for; at thousands of connections a second a Session with its
        # attribution, kept linger_s, was tens of MiB.
        self._closed: OrderedDict[Key, int] = OrderedDict()
        self._lock = threading.Lock()
        self.linger_s = linger_s
        self.opened = 0
        # Another table's match (the native opener's sessions), or None.
        self.also: Callable[[str, int, str, int], bool] | None = None

    def add(self, s: Session) -> None:
        with self._lock:
            self._open[s.key] = s
            self.opened += 1

    def close(self, s: Session) -> None:
        s.closed_ns = time.monotonic_ns()
        with self._lock:
            self._open.pop(s.key, None)
            self._closed[s.key] = s.closed_ns
            self._closed.move_to_end(s.key)
            self._expire(s.closed_ns)

    def _expire(self, now_ns: int) -> None:
        horizon = now_ns - int(self.linger_s * 1e9)
        while self._closed:
            key, closed_ns = next(iter(self._closed.items()))
            if closed_ns >= horizon:
                break
            del self._closed[key]

    def match(self, client_ip: str, client_port: int, dst_ip: str, dst_port: int) -> bool:
        key = (client_ip, client_port, dst_ip, dst_port)
        with self._lock:
            if key in self._open or key in self._closed:
                return True
        return self.also is not None and self.also(*key)

    def statistics(self) -> dict:
        with self._lock:
            return {"open": len(self._open), "recently_closed": len(self._closed),
                    "opened_total": self.opened}
