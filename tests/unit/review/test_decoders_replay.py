"""Every recorded stream decodes to the same events however it is chunked."""

from __future__ import annotations

import pytest
from _streams import FIXTURES, bytewise, decode, load, merged, random_splits

from agent.review.decoders import Direction, Undecodable

NAMES = sorted(FIXTURES)


@pytest.mark.parametrize("name", NAMES)
def test_clean_capture_has_no_undecodable(name: str) -> None:
    events = decode(name)
    assert len(events) >= 2
    assert not [e for e in events if isinstance(e, Undecodable)]


@pytest.mark.parametrize("name", NAMES)
def test_byte_by_byte_gives_same_events(name: str) -> None:
    assert decode(name, bytewise(load(name))) == decode(name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("seed", range(3))
def test_random_splits_give_same_events(name: str, seed: int) -> None:
    assert decode(name, random_splits(load(name), seed)) == decode(name)


@pytest.mark.parametrize("name", NAMES)
def test_merged_chunks_give_same_events(name: str) -> None:
    assert decode(name, merged(load(name))) == decode(name)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("garbage", [b"\xff" * 64, b"\x00\x00\x00\x05zzzzz\r\n\r\n", bytes(range(256))])
@pytest.mark.parametrize("direction", list(Direction))
def test_trailing_garbage_keeps_the_events_before_it(name: str, garbage: bytes, direction: Direction) -> None:
    clean = decode(name, end=False)
    dirty = decode(name, [*load(name), (direction, garbage)])
    assert dirty[: len(clean)] == clean
