"""What a SEAL record says and how its MAC is made; shared by writer and verify.

A seal at sequence s covers the chain up to s-1: it carries the head (the
hash of record s-1, which is also the seal frame's own prev field), the
epoch of the key that made it, and an HMAC over store id, epoch, covered
seq, head and time. Epochs count seals: seal n is made with k_n (keys.py),
so verify requires epochs to go up by exactly one. An intruder holding k_n
can make seals n, n+1, ... but never one for an epoch below n; any change to
data sealed before would need those seals re-made, so it fails.
"""

from __future__ import annotations

import hmac
import struct

import orjson

ALGO = "hmac-sha256-ratchet-v1"
_LABEL = b"tollgate seal message v1\0"
_FIELDS = struct.Struct(">QqQ32s")


def seal_message(store_id: str, epoch: int, upto_seq: int, head: bytes, ts_ns: int) -> bytes:
    return _LABEL + _FIELDS.pack(epoch, upto_seq, ts_ns, head) + store_id.encode()


def seal_payload(mac_key: bytes, key_id: bytes, store_id: str, epoch: int,
                 upto_seq: int, head: bytes, ts_ns: int) -> bytes:
    mac = hmac.digest(mac_key, seal_message(store_id, epoch, upto_seq, head, ts_ns), "sha256")
    return orjson.dumps({"algo": ALGO, "key_id": key_id.hex(), "epoch": epoch,
                         "upto_seq": upto_seq, "head": head.hex(), "mac": mac.hex()})


def parse_seal(payload: bytes) -> dict:
    """The seal's fields, typed; ValueError when it is not a seal we know."""
    try:
        obj = orjson.loads(payload)
        out = {"key_id": bytes.fromhex(obj["key_id"]), "epoch": int(obj["epoch"]),
               "upto_seq": int(obj["upto_seq"]), "head": bytes.fromhex(obj["head"]),
               "mac": bytes.fromhex(obj["mac"])}
        if obj["algo"] != ALGO:
            raise ValueError(f"unknown seal algorithm {obj['algo']!r}")
    except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError) as e:
        raise ValueError(f"malformed seal: {e}") from None
    return out


def mac_ok(seal: dict, mac_key: bytes, store_id: str, ts_ns: int) -> bool:
    want = hmac.digest(mac_key, seal_message(store_id, seal["epoch"], seal["upto_seq"],
                                             seal["head"], ts_ns), "sha256")
    return hmac.compare_digest(want, seal["mac"])
