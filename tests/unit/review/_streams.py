"""Load the recorded byte streams of tests/fixtures/streams and replay them."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from pathlib import Path

from agent.review.decoders import Decoder, Direction, Event, decoder_for

STREAMS = Path(__file__).resolve().parents[2] / "fixtures" / "streams"
Chunks = list[tuple[Direction, bytes]]

# fixture file -> decoder that owns it
FIXTURES = {
    "postgres-psql": "postgres",
    "postgres-ssl": "postgres",
    "postgres-pgbench-0": "postgres",
    "postgres-pgbench-1": "postgres",
    "mysql-cli": "mysql",
    "mysql-prepared": "mysql",
    "http-curl": "http",
    "http-pipelined": "http",
    "redis-cli": "redis",
    "redis-resp3": "redis",
    "redis-inline": "redis",
    "tls12-curl": "tls",
    "tls13-curl": "tls",
    "ssh-client": "ssh",
    "dns-tcp": "dns",
}


def load(name: str) -> Chunks:
    out = []
    for line in (STREAMS / f"{name}.jsonl").read_text().splitlines():
        record = json.loads(line)
        out.append((Direction.CLIENT if record["dir"] == "c" else Direction.SERVER, bytes.fromhex(record["hex"])))
    return out


def feed_all(decoder: Decoder, chunks: Chunks, *, end: bool = True) -> list[Event]:
    events: list[Event] = []
    for direction, data in chunks:
        decoder.feed(direction, data)
        while (event := decoder.next_event()) is not None:
            events.append(event)
    if end:
        for direction in Direction:
            decoder.end(direction)
        events += decoder.events()
    return events


def decode(name: str, chunks: Chunks | None = None, *, end: bool = True) -> list[Event]:
    return feed_all(decoder_for(FIXTURES[name]), load(name) if chunks is None else chunks, end=end)


def resplit(chunks: Chunks, cut: Callable[[bytes], list[int]]) -> Chunks:
    """The same bytes in the same order, each chunk cut at the given points."""
    out = []
    for direction, data in chunks:
        points = [0, *sorted(set(cut(data))), len(data)]
        out += [(direction, data[a:b]) for a, b in zip(points, points[1:]) if b > a]
    return out


def bytewise(chunks: Chunks) -> Chunks:
    return resplit(chunks, lambda data: list(range(len(data))))


def random_splits(chunks: Chunks, seed: int) -> Chunks:
    rng = random.Random(seed)
    return resplit(chunks, lambda data: [rng.randrange(len(data) + 1) for _ in range(rng.randrange(4))])


def of(events: list[Event], kind: type) -> list:
    return [e for e in events if isinstance(e, kind)]


def merged(chunks: Chunks) -> Chunks:
    """Consecutive chunks of one direction joined, as a slower reader would see them."""
    out: Chunks = []
    for direction, data in chunks:
        if out and out[-1][0] is direction:
            out[-1] = (direction, out[-1][1] + data)
        else:
            out.append((direction, data))
    return out


def _vec(data: bytes, size: int = 2) -> bytes:
    return len(data).to_bytes(size, "big") + data


def client_hello_record(sni: str, alpn: tuple[bytes, ...] = ()) -> bytes:
    """A minimal TLS 1.2-style ClientHello record with SNI (and ALPN) extensions."""
    name = sni.encode()
    extensions = b"\x00\x00" + _vec(_vec(b"\x00" + _vec(name)))
    if alpn:
        extensions += b"\x00\x10" + _vec(_vec(b"".join(_vec(p, 1) for p in alpn)))
    body = b"\x03\x03" + bytes(32) + b"\x00" + _vec(b"\x13\x01\xc0\x2f") + b"\x01\x00" + _vec(extensions)
    handshake = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + _vec(handshake)
