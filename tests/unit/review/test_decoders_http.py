from __future__ import annotations

import gzip

from _streams import decode, feed_all, of

from agent.review.decoders import (
    Direction, HttpDecoder, HttpRequest, HttpResponse, Opaque, ProtocolSwitch, Undecodable,
)

C, S = Direction.CLIENT, Direction.SERVER


def test_curl_keepalive_session() -> None:
    events = decode("http-curl")
    requests, responses = of(events, HttpRequest), of(events, HttpResponse)
    assert [(r.method, r.target) for r in requests] == [
        ("GET", "/index.html"), ("GET", "/notes.txt"), ("HEAD", "/missing"), ("GET", "/index.html"), ("POST", "/index.html"),
    ]
    assert [r.status for r in responses] == [200, 200, 404, 304, 405]
    assert responses[0].body == b"<h1>hello tollgate</h1>\n"
    # gzip body arrived chunked: the chunks are joined, the encoding left as sent
    assert gzip.decompress(responses[1].body) == b"line of plain text\n" * 20
    assert responses[2].body == b"" and ("Content-Length", "153") in responses[2].headers  # HEAD: no body
    assert responses[3].body == b""  # 304
    assert requests[4].body == b"a=1&b=2" and ("Transfer-Encoding", "chunked") in requests[4].headers


def test_pipelined_requests_pair_with_responses() -> None:
    events = decode("http-pipelined")
    assert [r.method for r in of(events, HttpRequest)] == ["GET", "HEAD", "GET"]
    assert [len(r.body) for r in of(events, HttpResponse)] == [24, 0, 24]


def _run(*chunks: tuple[Direction, bytes]) -> list:
    return feed_all(HttpDecoder(), list(chunks))


def test_informational_and_bodiless_responses() -> None:
    events = _run(
        (C, b"POST /u HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n"),
        (S, b"HTTP/1.1 100 Continue\r\n\r\n"),
        (C, b"abc"),
        (S, b"HTTP/1.1 204 No Content\r\nContent-Length: 99\r\n\r\nHTTP/1.1 200 OK\r\n"),
    )
    responses = of(events, HttpResponse)
    assert [r.status for r in responses] == [100, 204]
    assert of(events, HttpRequest)[0].body == b"abc"


def test_chunked_with_trailers_and_read_to_eof() -> None:
    events = _run(
        (C, b"GET /a HTTP/1.1\r\n\r\nGET /b HTTP/1.1\r\n\r\n"),
        (S, b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n"),
        (S, b"HTTP/1.0 200 OK\r\nConnection: close\r\n\r\nuntil the end"),
    )
    first = of(events, HttpResponse)[0]
    assert (first.body, first.trailers) == (b"abcde", (("X-Sum", "5"),))
    last = of(events, HttpResponse)[1]
    assert last.body == b"until the end" and last.body_size == 13


def test_upgrade_makes_the_rest_opaque() -> None:
    events = _run(
        (C, b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n\x81\x05hello"),
        (S, b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n\r\n\x81\x02hi"),
    )
    assert ProtocolSwitch(direction=S, protocol="websocket") in events
    assert Opaque(direction=C, data=b"\x81\x05hello", size=7) in events
    assert Opaque(direction=S, data=b"\x81\x02hi", size=4) in events


def test_connect_tunnel_and_refused_connect() -> None:
    events = _run(
        (C, b"CONNECT db:5432 HTTP/1.1\r\n\r\n"),
        (S, b"HTTP/1.1 200 Connection established\r\n\r\n"),
        (C, b"\x16\x03\x01tunnelled"),
    )
    assert ProtocolSwitch(direction=S, protocol="tunnel") in events and of(events, Opaque)[0].size == 12
    refused = _run(
        (C, b"CONNECT db:5432 HTTP/1.1\r\n\r\nGET / HTTP/1.1\r\n\r\n"),
        (S, b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n"),
    )
    assert [r.method for r in of(refused, HttpRequest)] == ["CONNECT", "GET"]


def test_garbage_is_undecodable_not_an_exception() -> None:
    events = _run((C, b"GET / HTTP/1.1\r\n\r\n"), (C, b"\x00\x01 not http\r\n\r\n"))
    assert of(events, HttpRequest) and of(events, Undecodable)[0].offset == 18
