from __future__ import annotations

from _streams import decode, feed_all, of

from agent.review.decoders import Direction, Error, RedisCommand, RedisDecoder, RedisReply

C, S = Direction.CLIENT, Direction.SERVER


def test_redis_cli_commands_and_replies() -> None:
    events = decode("redis-cli")
    pairs = list(zip(of(events, RedisCommand)[1:], [e for e in events if e.direction is S][1:]))
    as_seen = [(c.args, r.value if isinstance(r, RedisReply) else r.message) for c, r in pairs]
    assert as_seen[:6] == [
        (("SET", "greeting", "hello"), "OK"),
        (("GET", "greeting"), "hello"),
        (("RPUSH", "l", "a", "b", "c"), 3),
        (("LRANGE", "l", "0", "-1"), ("a", "b", "c")),
        (("INCR", "n"), 1),
        (("GET", "missing"), None),
    ]
    assert of(events, Error)[0].code == "ERR" and "NOSUCH" in of(events, Error)[0].message


def test_resp3_maps_and_inline_commands() -> None:
    hello = of(decode("redis-resp3"), RedisReply)
    assert dict(hello[0].value)["proto"] == 3
    assert hello[1].value == (("f", "v"),)
    inline = decode("redis-inline")
    assert [c.args for c in of(inline, RedisCommand)] == [("PING",), ("ECHO", "hi there"), ("QUIT",)]
    assert [r.value for r in of(inline, RedisReply)] == ["PONG", "hi there", "OK"]


def test_resp3_types_and_nested_errors() -> None:
    reply = b"*6\r\n#t\r\n,3.5\r\n(123\r\n_\r\n-ERR inner\r\n|1\r\n+ttl\r\n:5\r\n$1\r\nx\r\n" b"=8\r\ntxt:abcd\r\n"
    events = feed_all(RedisDecoder(), [(S, reply)])
    assert of(events, RedisReply) == [
        RedisReply(direction=S, value=(True, "3.5", 123, None, "(error) ERR inner", "x")),
        RedisReply(direction=S, value="abcd"),
    ]
