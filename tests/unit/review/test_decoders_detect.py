from __future__ import annotations

import pytest
from _streams import FIXTURES, bytewise, load, of

from agent.review.decoders import (
    DECODERS, Direction, HttpRequest, Opaque, PostgresDecoder, Query, SessionDecoder, Undecodable, decode_session,
    decoder_for, detect,
)

C, S = Direction.CLIENT, Direction.SERVER


def _first(chunks: list, direction: Direction) -> bytes:
    return b"".join(data for d, data in chunks if d is direction)


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_every_capture_is_detected_from_its_bytes_alone(name: str) -> None:
    chunks = load(name)
    assert detect(_first(chunks, C), _first(chunks, S)) == FIXTURES[name]


@pytest.mark.parametrize(
    ("client", "server", "port", "expected"),
    [
        (b"\x00\x00\x00\x08\x04\xd2\x16\x2f", b"", None, "postgres"),  # SSLRequest
        (b"SSH-2.0-x\r\n", b"", 443, "ssh"),  # the bytes win over the port
        (b"", b"SSH-2.0-OpenSSH\r\n", None, "ssh"),  # server speaks first
        (b"OPTIONS * HTTP/1.1\r\n", b"", None, "http"),
        (b"*1\r\n$4\r\nPING\r\n", b"+PONG\r\n", None, "redis"),
        (b"PING\r\n", b"+PONG\r\n", None, "redis"),
        (b"hello", b"world", 5432, None),  # the port alone decides nothing
        (b"", b"", 80, None),
    ],
)
def test_detect_cases(client: bytes, server: bytes, port: int | None, expected: str | None) -> None:
    assert detect(client, server, port) == expected


def test_decoder_for_every_name() -> None:
    assert {type(decoder_for(name)).name for name in DECODERS} == set(DECODERS)
    with pytest.raises(KeyError):
        decoder_for("gopher")


@pytest.mark.parametrize("name", ["postgres-pgbench-1", "http-curl", "mysql-prepared", "ssh-client"])
def test_session_decoder_detects_and_decodes_byte_by_byte(name: str) -> None:
    whole = decode_session(load(name))
    assert decode_session(bytewise(load(name))) == whole
    assert decode_session(load(name), protocol=FIXTURES[name]) == whole


def test_pgbench_statements_counted_through_session() -> None:
    assert len(of(decode_session(load("postgres-pgbench-1")), Query)) == 35


def test_unknown_protocol_is_opaque() -> None:
    events = decode_session([(C, b"\x01\x02hello"), (C, b" there"), (S, b"ok")])
    assert events == [Opaque(direction=C, data=b"\x01\x02hello there", size=13), Opaque(direction=S, data=b"ok", size=2)]


def test_a_decoder_bug_becomes_undecodable_and_the_rest_opaque(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, r) -> None:
        raise ZeroDivisionError("bug")

    monkeypatch.setattr(PostgresDecoder, "_parse_ready", broken)
    session = SessionDecoder()
    for direction, data in load("postgres-psql"):
        session.feed(direction, data)
    for direction in Direction:
        session.end(direction)
    events = session.events()
    failure = of(events, Undecodable)[0]
    assert failure.direction is S and "ZeroDivisionError" in failure.reason
    assert session.protocol == "opaque" and of(events, Opaque)


def test_session_detects_late_when_only_one_side_spoke() -> None:
    events = decode_session([(C, b"GET / HTTP/1.1\r\nHost: a\r\n\r\n")])
    assert of(events, HttpRequest)[0].target == "/"
