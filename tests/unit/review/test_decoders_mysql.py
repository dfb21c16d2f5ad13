from __future__ import annotations

from _streams import client_hello_record, decode, feed_all, of

from agent.review.decoders import (
    CommandComplete, Direction, Error, Greeting, Message, MysqlDecoder, Prepare, ProtocolSwitch, Query,
    ResultSet, Startup, TlsClientHello,
)

C, S = Direction.CLIENT, Direction.SERVER


def test_cli_session_queries_and_text_results() -> None:
    events = decode("mysql-cli")
    assert of(events, Greeting)[0].server_version.endswith("MariaDB-0+deb12u1")
    startup = of(events, Startup)[0]
    assert (startup.user, startup.database) == ("app", "app")
    assert ("program_name", "mysql") in startup.params
    assert [q.text for q in of(events, Query)][-1] == "SELECT nope FROM t"
    table = of(events, ResultSet)[0]
    assert table.columns == ("id", "name", "score", "born")
    assert table.rows == (("1", "alice", "1.5", "2001-02-03"), ("2", None, "-2", None))
    assert of(events, CommandComplete)[1].tag.startswith("OK, 2 rows affected")
    error = of(events, Error)[0]
    assert (error.code, error.fields) == ("1054", (("sqlstate", "42S22"),))
    assert "nope" in error.message
    assert isinstance(events[-1], Message) and events[-1].name == "COM_QUIT"


def test_prepared_statements_binary_rows() -> None:
    events = decode("mysql-prepared")
    prepares = of(events, Prepare)
    assert [p.statement for p in prepares] == ["1", "2", "3"]
    queries = of(events, Query)
    # mariadb-test --ps-protocol executes each SELECT twice
    assert [q.statement for q in queries] == ["1", "1", "2", "2", "3"]
    assert queries[0].text == prepares[0].text == "SELECT id, name, score, born FROM t WHERE id > 0 ORDER BY id"
    tables = of(events, ResultSet)
    # binary rows decoded by column type: INT, VARCHAR, DOUBLE, DATE and NULLs
    assert tables[0].rows == (("1", "alice", "1.5", "2001-02-03"), ("2", None, "-2.0", None))
    assert tables[2].rows == (("x42",),)
    assert of(events, CommandComplete)[-1].tag == "OK, 1 rows affected"


def _packet(seq: int, payload: bytes) -> bytes:
    return len(payload).to_bytes(3, "little") + bytes([seq]) + payload


GREETING = _packet(0, b"\x0a8.0.36\0" + (7).to_bytes(4, "little") + b"12345678\0" + b"\xff\xff" + b"\x21\x02\x00"
                   + b"\xff\x01" + b"\x15" + bytes(10) + b"123456789012\0" + b"mysql_native_password\0")


def test_execute_params_decoded_by_bound_types() -> None:
    caps = (0x200 | 0x8000 | 0x80000 | 0x8 | 0x1000000).to_bytes(4, "little")
    login = caps + bytes(4) + b"\x21" + bytes(23) + b"bob\0" + b"\x00" + b"shop\0" + b"mysql_native_password\0"
    prepare_ok = b"\x00" + (9).to_bytes(4, "little") + (0).to_bytes(2, "little") + (2).to_bytes(2, "little") + b"\0\0\0"
    param_def = b"\x03def\0\0\0\x01?\0\x0c\x3f\x00\x00\x00\x00\x00\xfd\x00\x00\x00\x00\x00"
    execute = (b"\x17" + (9).to_bytes(4, "little") + b"\x00" + (1).to_bytes(4, "little") + b"\x00" + b"\x01"
               + b"\x08\x00" + b"\xfd\x00" + (-5).to_bytes(8, "little", signed=True) + b"\x03abc")
    stream = [
        (S, GREETING),
        (C, _packet(1, login)),
        (S, _packet(2, b"\x00\x00\x00\x02\x00\x00\x00")),
        (C, _packet(0, b"\x16UPDATE t SET n = ? WHERE k = ?")),
        (S, _packet(1, prepare_ok) + _packet(2, param_def) + _packet(3, param_def)),
        (C, _packet(0, execute)),
        (S, _packet(1, b"\x00\x01\x00\x02\x00\x00\x00")),
        (C, _packet(0, b"\x03SELECT k")),
        # CLIENT_DEPRECATE_EOF: no EOF after the definitions, an OK with 0xfe header ends the rows
        (S, _packet(1, b"\x01") + _packet(2, param_def.replace(b"\x01?", b"\x01k")) + _packet(3, b"\x03abc")
         + _packet(4, b"\xfb") + _packet(5, b"\xfe\x00\x00\x02\x00\x00\x00")),
    ]
    events = feed_all(MysqlDecoder(), stream)
    assert of(events, ResultSet) == [ResultSet(direction=S, columns=("k",), rows=(("abc",), (None,)), row_count=2)]
    startup = of(events, Startup)[0]
    assert (startup.user, startup.database) == ("bob", "shop")
    assert of(events, Query)[0] == Query(direction=C, text="UPDATE t SET n = ? WHERE k = ?", params=("-5", "abc"), statement="9")
    assert of(events, CommandComplete)[0].tag == "OK, 1 rows affected"


def test_ssl_request_hands_over_to_tls() -> None:
    caps = (0x200 | 0x8000 | 0x800).to_bytes(4, "little")
    client_hello = client_hello_record("db.example")
    stream = [(S, GREETING), (C, _packet(1, caps + bytes(4) + b"\x21" + bytes(23))), (C, client_hello)]
    events = feed_all(MysqlDecoder(), stream)
    assert ProtocolSwitch(direction=C, protocol="tls") in events
    assert of(events, TlsClientHello)[0].sni == "db.example"
