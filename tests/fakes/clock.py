"""A clock tests can warp: sleep() advances it instead of waiting."""

from __future__ import annotations

import threading
import time


class WarpClock:
    def __init__(self, start: float | None = None, real_pause_s: float = 0.0):
        self._now = time.time() if start is None else start
        self._pause = real_pause_s  # lets other threads run between warps
        self._lock = threading.Lock()
        self.slept = 0.0

    def time(self) -> float:
        with self._lock:
            return self._now

    def sleep(self, seconds: float) -> bool:
        with self._lock:
            self._now += seconds
            self.slept += seconds
        if self._pause:
            time.sleep(self._pause)
        return False
