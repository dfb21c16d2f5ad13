"""Test helpers: build sealed stores, and rewrite one as an intruder would
(re-chained, re-named, summaries fixed) without the verification key."""

from __future__ import annotations

from pathlib import Path

import orjson

from agent.store import Direction, Kind, SealKey, StoreWriter, init_key
from agent.store.format import (
    FRAME_OVERHEAD, ZERO_HASH, encode_header, frame_digest, segment_name,
)
from agent.store.immutable import set_immutable
from agent.store.reader import Tail, scan_segment, segment_paths


def build_store(root: Path, *, records: int = 60, seal_every: int = 7,
                segment_max_bytes: int = 2500, key: bool = True,
                immutable: bool = False) -> tuple[Path, bytes | None]:
    """A store of DATA/EVENT records, sealed every seal_every records, several segments."""
    store, k0 = root / "store", None
    seal_key = None
    if key:
        k0 = init_key(root / "keys" / "seal.key")
        seal_key = SealKey(root / "keys" / "seal.key")
    w = StoreWriter(store, segment_max_bytes=segment_max_bytes, seal_key=seal_key,
                    seal_interval_s=3600, seal_interval_bytes=1 << 30, immutable=immutable)
    for i in range(records):
        if i % 5 == 4:
            w.append_json(Kind.EVENT, {"event": "tick", "i": i})
        else:
            w.append_data(i // 10, Direction(i % 2), bytes([i % 251]) * (20 + 7 * i % 90))
        if key and i % seal_every == seal_every - 1:
            w.seal_now()
    w.close()
    return store, k0


def segments(store: Path) -> list[list]:
    """Whole records per segment (no chain check: the tests break chains)."""
    out = []
    for p in segment_paths(store):
        out.append([r for r in scan_segment(p) if not isinstance(r, Tail)])
    return out


def frame_spans(store: Path) -> list[tuple[str, int, int, object]]:
    """(segment name, start, end, record) of every frame."""
    spans = []
    for seg in segments(store):
        for r in seg:
            spans.append((r.segment, r.offset, r.offset + FRAME_OVERHEAD + len(r.payload), r))
    return spans


def unlock(store: Path) -> None:
    for p in store.glob("*.seg"):
        set_immutable(p, False)


def rewrite(store: Path, segs: list[list[tuple[int, int, bytes]]]) -> None:
    """Write segments of (kind, ts, payload) back with a valid chain, names and
    summaries, as an intruder without the key would; seal MACs stay as they were."""
    unlock(store)
    for p in segment_paths(store):
        p.unlink()
    seq, head, previous = 0, ZERO_HASH, None
    for seg in segs:
        first, size, buf = seq, 0, bytearray()
        for kind, ts, payload in seg:
            if kind == Kind.SEGMENT_START:
                obj = orjson.loads(payload)
                obj["previous"] = previous
                payload = orjson.dumps(obj)
            elif kind == Kind.SEAL:
                obj = orjson.loads(payload)
                obj["upto_seq"], obj["head"] = seq - 1, head.hex()
                payload = orjson.dumps(obj)
            header = encode_header(kind, len(payload), seq, ts, head)
            head, crc = frame_digest(header, payload)
            buf += header + payload + crc
            seq += 1
        (store / segment_name(first)).write_bytes(bytes(buf))
        previous = {"segment": segment_name(first), "first_seq": first, "last_seq": seq - 1,
                    "bytes": len(buf), "head": head.hex()}


def as_tuples(segs: list[list]) -> list[list[tuple[int, int, bytes]]]:
    return [[(r.kind, r.ts_ns, r.payload) for r in seg] for seg in segs]


def flip(path: Path, offset: int, bit: int) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ (1 << bit)]))
