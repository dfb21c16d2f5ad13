"""ReadCache: a read is reused for ttl_s, then made again; the oldest entries
go first when it is full; a read that raises is not kept."""

from __future__ import annotations

import time

import pytest

from agent.readcache import ReadCache


def counting():
    reads: list[int] = []

    def read(key: int) -> str:
        reads.append(key)
        return f"v{key}-{len(reads)}"
    return reads, read


def test_a_read_is_reused_within_ttl_and_made_again_after(monkeypatch):
    reads, read = counting()
    c = ReadCache(60, 10)
    assert c.get(7, read) == c.get(7, read) == "v7-1" and reads == [7]
    real = time.monotonic
    monkeypatch.setattr(time, "monotonic", lambda: real() + 61)  # the ttl passes
    assert c.get(7, read) == "v7-2" and reads == [7, 7]


def test_the_oldest_entry_goes_first_when_full():
    reads, read = counting()
    c = ReadCache(60, 2)
    for key in (1, 2, 3):
        c.get(key, read)
    c.get(3, read)
    c.get(2, read)
    assert reads == [1, 2, 3]
    c.get(1, read)                  # evicted: read again
    assert reads == [1, 2, 3, 1]


def test_a_failed_read_is_not_kept():
    c = ReadCache(60, 2)

    def fail(key):
        raise OSError("gone")
    with pytest.raises(OSError):
        c.get(1, fail)
    assert c.get(1, lambda k: "ok") == "ok"
