"""What was read from /proc about a process, kept a short while.

Evidence asks for the same processes on every connection (a busy client,
its parents, the subject's login); reading them again each time cost more
than the rest of the connection. Kept ttl_s, short enough that a reused pid
is not taken for its predecessor; bounded, the oldest going first.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Generic, TypeVar

# How long a read of a process stands: short enough that a reused pid is not
# taken for its predecessor.
READ_TTL_S = 2.0

K = TypeVar("K")
V = TypeVar("V")


class ReadCache(Generic[K, V]):
    def __init__(self, ttl_s: float, capacity: int) -> None:
        self.ttl_s, self.capacity = ttl_s, capacity
        self._items: OrderedDict[K, tuple[float, V]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K, read: Callable[[K], V]) -> V:
        """The value read for key at most ttl_s ago, else read(key) now (not
        under the lock: reads of /proc may be slow, and may raise)."""
        now = time.monotonic()
        with self._lock:
            hit = self._items.get(key)
        if hit is not None and now - hit[0] < self.ttl_s:
            return hit[1]
        value = read(key)
        with self._lock:
            self._items[key] = (now, value)
            self._items.move_to_end(key)
            while len(self._items) > self.capacity:
                self._items.popitem(last=False)
        return value
