"""Group commit: durable(seq) returns only after an fsync covering seq; one serves many."""

from __future__ import annotations

import asyncio

from agent.store import Direction, StoreWriter
from agent.store.commit import GroupCommit


def test_one_fsync_serves_many_waiters(tmp_path):
    w = StoreWriter(tmp_path, durability="fsync", immutable=False)
    synced_at_return = []

    async def one(commit, i):
        seq = w.append_data(i, Direction.CLIENT, b"z" * 64)
        await commit.durable(seq)
        synced_at_return.append((seq, w.synced_seq))

    async def main():
        commit = GroupCommit(w, interval_ms=5)
        before = w.fsyncs
        await asyncio.gather(*(one(commit, i) for i in range(200)))
        used = w.fsyncs - before
        await commit.aclose()
        return used, commit

    used, commit = asyncio.run(main())
    assert len(synced_at_return) == 200
    assert all(synced >= seq for seq, synced in synced_at_return)
    assert 1 <= used <= 3 and commit.largest_batch >= 100
    w.close()


def test_durable_waits_for_the_fsync(tmp_path):
    w = StoreWriter(tmp_path, durability="fsync", immutable=False)

    async def main():
        commit = GroupCommit(w, interval_ms=1)
        seq = w.append_data(1, Direction.SERVER, b"a")
        assert w.synced_seq < seq
        fsyncs = w.fsyncs
        task = asyncio.ensure_future(commit.durable(seq))
        await asyncio.sleep(0)
        assert not task.done()
        await task
        assert w.synced_seq >= seq and w.fsyncs == fsyncs + 1
        await commit.durable(seq)  # already durable: no new fsync
        assert w.fsyncs == fsyncs + 1
        await commit.aclose()

    asyncio.run(main())
    w.close()
