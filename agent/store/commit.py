"""Group commit: many appenders, one fsync, nobody blocks the event loop.

The proxy appends (page cache), then awaits durable(seq) before forwarding.
One background task batches every waiter that arrived since the last fsync
into the next one, run in a worker thread; fsyncs are at least interval_ms
apart so a busy store makes few large fsyncs instead of many small ones.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import time

from agent.store.writer import StoreError, StoreWriter


class GroupCommit:
    def __init__(self, writer: StoreWriter, interval_ms: float = 2.0) -> None:
        self.writer = writer
        self.interval_s = interval_ms / 1000
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._order = itertools.count()  # ties in seq: futures do not compare
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._last_fsync = 0.0
        self.batches = 0
        self.largest_batch = 0

    def start(self) -> None:
        if self._task is None:
            self._wake = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="group-commit")

    async def durable(self, seq: int) -> None:
        """Return once an fsync covering seq has completed; StoreError if it failed."""
        if self.writer.synced_seq >= seq:
            return
        self.start()
        fut = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (seq, next(self._order), fut))
        self._wake.set()
        await fut

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            pause = self._last_fsync + self.interval_s - time.monotonic()
            if pause > 0:
                await asyncio.sleep(pause)  # let the batch grow
            await self._flush()

    async def _flush(self) -> None:
        waiting = len(self._waiters)
        try:
            upto = await asyncio.to_thread(self.writer.sync)
        except StoreError as e:
            self._fail_all(e)
            return
        finally:
            self._last_fsync = time.monotonic()
        done = 0
        while self._waiters and self._waiters[0][0] <= upto:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_result(None)
            done += 1
        self.batches += 1
        self.largest_batch = max(self.largest_batch, done)
        if self._waiters and waiting > done:
            self._wake.set()  # appended after the fsync began: they need the next one

    def _fail_all(self, e: StoreError) -> None:
        while self._waiters:
            _, _, fut = heapq.heappop(self._waiters)
            if not fut.done():
                fut.set_exception(StoreError(str(e)))

    def statistics(self) -> dict:
        return {"batches": self.batches, "largest_batch": self.largest_batch,
                "waiting": len(self._waiters), "fsyncs": self.writer.fsyncs}

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        self._fail_all(StoreError("group commit closed"))
