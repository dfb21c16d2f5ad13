from __future__ import annotations

import struct

from _streams import decode, feed_all, of

from agent.review.decoders import (
    AuthResponse, CommandComplete, Direction, Encrypted, Error, Message, PostgresDecoder, Prepare,
    ProtocolSwitch, Query, Ready, ResultSet, Startup, TlsClientHello, TlsServerHello, Undecodable,
)

C, S = Direction.CLIENT, Direction.SERVER


def test_psql_session_shows_statements_and_results() -> None:
    events = decode("postgres-psql")
    assert of(events, Startup)[0].user == "postgres"
    assert [a.mechanism for a in of(events, AuthResponse)] == ["SCRAM-SHA-256", "sasl"]
    assert [q.text for q in of(events, Query)][:3] == [
        "CREATE TABLE t (id int PRIMARY KEY, name text, note text)",
        "INSERT INTO t VALUES (1, 'alice', NULL), (2, 'bob', 'tab\tnote')",
        "SELECT id, name, note FROM t ORDER BY id",
    ]
    table = of(events, ResultSet)[0]
    assert table.columns == ("id", "name", "note")
    assert table.rows == (("1", "alice", None), ("2", "bob", "tab\tnote"))
    assert "SELECT 2" in [c.tag for c in of(events, CommandComplete)]
    error = of(events, Error)[0]
    assert error.code == "42703" and "no_such_column" in error.message
    # two statements in one simple query: two result sets, two tags
    assert [r.rows for r in of(events, ResultSet)[1:]] == [(("1",),), (("two",),)]


def test_pgbench_prepared_every_execute_is_one_query() -> None:
    events = decode("postgres-pgbench-1")
    queries = of(events, Query)
    # pgbench -t 5 of the TPC-B-like script: BEGIN, 3 UPDATEs, SELECT, INSERT, END per transaction
    assert len(queries) == 5 * 7
    assert len(of(events, Prepare)) == 7
    update = queries[1]
    assert update.text.startswith("UPDATE pgbench_accounts SET abalance = abalance + $1")
    assert update.statement == "P_1" and len(update.params) == 2 and all(p.lstrip("-").isdigit() for p in update.params)
    assert sum(1 for c in of(events, CommandComplete) if c.tag == "COMMIT") == 5
    select = of(events, ResultSet)[0]
    assert select.columns == ("abalance",) and select.row_count == 1


def test_ssl_request_hands_over_to_tls() -> None:
    events = decode("postgres-ssl")
    assert isinstance(events[0], Message) and events[0].name == "SSLRequest"
    assert events[1] == ProtocolSwitch(direction=S, protocol="tls")
    assert "TLS 1.3" in of(events, TlsClientHello)[0].versions
    assert of(events, TlsServerHello)[0].version == "TLS 1.3"
    assert of(events, Encrypted) and not of(events, Query)


def _msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!I", len(body) + 4) + body


STARTUP = struct.pack("!II", 18, 196608) + b"user\0bob\0\0"


def test_bind_decodes_text_and_shows_binary_and_null_params() -> None:
    bind_body = (
        b"\0S1\0" + struct.pack("!H", 3) + struct.pack("!HHH", 0, 1, 0) + struct.pack("!H", 3)
        + struct.pack("!i", 2) + b"42" + struct.pack("!i", 2) + b"\x01\xff" + struct.pack("!i", -1)
        + struct.pack("!H", 0)
    )
    stream = [
        (C, STARTUP),
        (C, _msg(b"P", b"S1\0SELECT $1, $2, $3\0" + struct.pack("!H", 0)) + _msg(b"B", bind_body)),
        (C, _msg(b"E", b"\0" + struct.pack("!I", 0)) + _msg(b"S", b"")),
        (S, _msg(b"C", b"SELECT 0\0") + _msg(b"Z", b"I")),
    ]
    events = feed_all(PostgresDecoder(), stream)
    assert of(events, Startup)[0].database == "bob"  # defaults to the user name
    assert of(events, Query) == [Query(direction=C, text="SELECT $1, $2, $3", params=("42", "\\x01ff", None), statement="S1")]
    assert of(events, Ready)[0].status == "idle"


def test_copy_out_data_passes_through() -> None:
    stream = [
        (C, STARTUP + _msg(b"Q", b"COPY t TO STDOUT\0")),
        (S, _msg(b"H", b"\0" + struct.pack("!HH", 1, 0)) + _msg(b"d", b"1\talice\n") + _msg(b"c", b"") + _msg(b"C", b"COPY 1\0")),
    ]
    events = feed_all(PostgresDecoder(), stream)
    data = [m for m in of(events, Message) if m.name == "CopyData"]
    assert data[0].fields == (("data", "1\talice\n"),)
    assert of(events, CommandComplete)[0].tag == "COPY 1"


def test_gssenc_accepted_turns_encrypted() -> None:
    stream = [(C, struct.pack("!II", 8, 80877104)), (S, b"G"), (C, b"\x60\x82" + bytes(30)), (S, bytes(10))]
    events = feed_all(PostgresDecoder(), stream)
    assert events[1] == ProtocolSwitch(direction=S, protocol="gssapi")
    assert of(events, Encrypted) == [Encrypted(direction=C, byte_count=32), Encrypted(direction=S, byte_count=10)]


def test_bad_length_is_undecodable_with_offset() -> None:
    stream = [(C, STARTUP + b"Q\x00\x00\x00\x01")]
    events = feed_all(PostgresDecoder(), stream)
    assert of(events, Undecodable) == [Undecodable(direction=C, reason="message length 1", offset=18)]


def test_truncated_stream_reports_leftover_at_end() -> None:
    stream = [(C, STARTUP + _msg(b"Q", b"SELECT 1\0")[:-3])]
    events = feed_all(PostgresDecoder(), stream)
    assert isinstance(events[-1], Undecodable) and events[-1].offset == 18
