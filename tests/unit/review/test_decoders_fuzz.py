"""Random and mutated bytes never make a decoder raise (invariant 6: bad input is data)."""

from __future__ import annotations

from _streams import FIXTURES, feed_all, load
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.review.decoders import DECODERS, Direction, Undecodable, decode_session, decoder_for

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
SMALL = sorted(name for name in FIXTURES if name != "redis-cli")  # redis-cli is 170 kB: too slow to mutate
chunks = st.lists(st.tuples(st.sampled_from(list(Direction)), st.binary(min_size=1, max_size=64)), max_size=12)


def _assert_at_most_one_undecodable_per_direction(events: list) -> None:
    for direction in Direction:
        assert len([e for e in events if isinstance(e, Undecodable) and e.direction is direction]) <= 1


@FUZZ
@given(name=st.sampled_from(sorted(set(DECODERS) - {"dns-udp"})), data=chunks)
def test_random_bytes_never_raise(name: str, data: list) -> None:
    events = feed_all(decoder_for(name), data)
    _assert_at_most_one_undecodable_per_direction(events)


@FUZZ
@given(data=chunks)
def test_udp_dns_random_datagrams_never_raise(data: list) -> None:
    feed_all(decoder_for("dns-udp"), data)


@FUZZ
@given(data=chunks, port=st.sampled_from([None, 22, 53, 80, 443, 3306, 5432, 6379]))
def test_session_detection_on_random_bytes_never_raises(data: list, port: int | None) -> None:
    decode_session(data, port=port)


@st.composite
def mutated(draw: st.DrawFn) -> tuple[str, list]:
    """A fixture with a few bytes flipped, dropped or inserted in one chunk."""
    name = draw(st.sampled_from(SMALL))
    stream = load(name)
    index = draw(st.integers(0, len(stream) - 1))
    direction, data = stream[index]
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        at = draw(st.integers(0, len(buf)))
        action = draw(st.sampled_from(["flip", "drop", "insert"]))
        if action == "insert" or not buf:
            buf[at:at] = draw(st.binary(min_size=1, max_size=8))
        elif action == "drop":
            del buf[min(at, len(buf) - 1)]
        else:
            buf[min(at, len(buf) - 1)] ^= draw(st.integers(1, 255))
    stream[index] = (direction, bytes(buf))
    return name, stream


@FUZZ
@given(case=mutated())
def test_mutated_captures_never_raise(case: tuple[str, list]) -> None:
    name, stream = case
    events = feed_all(decoder_for(FIXTURES[name]), stream)
    _assert_at_most_one_undecodable_per_direction(events)
    decode_session(stream)


@FUZZ
@given(case=mutated(), cut=st.integers(0, 10_000))
def test_truncated_captures_never_raise(case: tuple[str, list], cut: int) -> None:
    name, stream = case
    flat = [(d, b) for d, b in stream]
    total = 0
    kept = []
    for direction, data in flat:
        if total + len(data) > cut:
            kept.append((direction, data[: cut - total]))
            break
        kept.append((direction, data))
        total += len(data)
    feed_all(decoder_for(FIXTURES[name]), [(d, b) for d, b in kept if b])
