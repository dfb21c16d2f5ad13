"""The on-disk record format, in one place.

A segment file is a run of frames. One frame:

    magic  b"TG"   2 bytes
    version        1 byte   (FORMAT_VERSION)
    kind           1 byte   (Kind)
    length         4 bytes  payload length, big endian
    seq            8 bytes  gap-free across the whole store
    ts_ns          8 bytes  wall clock, nanoseconds since the epoch
    prev          32 bytes  SHA-256 of the previous frame (zeros for the first)
    payload   length bytes
    crc32          4 bytes  over everything above; detects a torn tail cheaply

A record's hash is SHA-256(header || BLAKE3(payload)), so the chain covers
kind, sequence, time and payload; the payload's own digest needs no lock, so
relay threads compute it in parallel before they take the chain (version 3).
BLAKE3 because every relayed byte goes through it: here it runs ~5x faster
than SHA-256. Frames of earlier versions are still read: version 2 hashed
SHA-256(header || SHA-256(payload)), version 1 SHA-256(header || payload).
Version 2 is also still written where the store's payload_hash is "sha256"
(sites that may use only FIPS-approved hashes).
Seals (checkpoints) are ordinary records whose payload signs a chain head;
they need nothing more from the frame.

The active segment may end in zeros: space the writer preallocated ahead of
its records (agent/native/chain.c). A frame's first byte is written after
the rest of it, so a zero byte where a frame would start is where the
written records end; a finished segment is cut back to its last record.
"""

from __future__ import annotations

import enum
import hashlib
import struct
import zlib
from dataclasses import dataclass

import blake3

MAGIC = b"TG"
UNWRITTEN = 0                           # a frame's first byte until it is whole
FORMAT_VERSION = 3                      # what this build writes by default
READABLE_VERSIONS = frozenset({1, 2, 3})
# The store's payload_hash setting -> the version its frames are written as.
PAYLOAD_HASH_VERSION = {"blake3": 3, "sha256": 2}
HEADER = struct.Struct(">2sBBIQQ32s")
CRC = struct.Struct(">I")
HEADER_SIZE = HEADER.size
FRAME_OVERHEAD = HEADER.size + CRC.size
ZERO_HASH = b"\0" * 32
# One frame never exceeds this; larger payloads are split by the caller.
MAX_PAYLOAD = 16 << 20

DATA_HEAD = struct.Struct(">QB")


class Kind(enum.IntEnum):
    SEGMENT_START = 1   # first record of every segment: store id, previous segment digest
    SESSION_OPEN = 2    # a relayed connection began (id = this record's seq)
    DATA = 3            # bytes of one direction of one session
    SESSION_CLOSE = 4   # byte counts and reason
    SESSION_INFO = 5    # attribution found after open: process chain, uid, cgroup
    EVENT = 6           # agent lifecycle, rules applied/removed
    ALERT = 7           # a typed alert with its evidence
    SEAL = 8            # checkpoint over the chain head
    RECOVERED = 9       # a torn tail was cut on start
    ACCESS = 10         # someone replayed or exported a session
    ACK = 11            # an alert was acknowledged


class Direction(enum.IntEnum):
    CLIENT = 0  # subject -> destination
    SERVER = 1  # destination -> subject


@dataclass(frozen=True, slots=True)
class Record:
    seq: int
    ts_ns: int
    kind: Kind
    prev: bytes
    payload: bytes
    hash: bytes
    segment: str
    offset: int
    version: int = FORMAT_VERSION   # of the frame: it says how the hash was made

    def json(self) -> dict:
        import orjson
        return orjson.loads(self.payload)

    def data(self) -> tuple[int, Direction, bytes]:
        """(session id, direction, bytes) of a DATA record."""
        sid, d = DATA_HEAD.unpack_from(self.payload)
        return sid, Direction(d), self.payload[DATA_HEAD.size:]


def encode_header(kind: int, length: int, seq: int, ts_ns: int, prev: bytes,
                  version: int = FORMAT_VERSION) -> bytes:
    return HEADER.pack(MAGIC, version, kind, length, seq, ts_ns, prev)


def frame_hash(header: bytes | memoryview, *payload_parts: bytes | memoryview) -> bytes:
    """The record's hash: the link the next frame's `prev` must hold."""
    if header[2] == 1:
        h = hashlib.sha256(header)
        for part in payload_parts:
            h.update(part)
        return h.digest()
    inner = blake3.blake3() if header[2] == 3 else hashlib.sha256()
    for part in payload_parts:
        inner.update(part)
    return hashlib.sha256(bytes(header) + inner.digest()).digest()


def frame_digest(header: bytes, *payload_parts: bytes) -> tuple[bytes, bytes]:
    """(record hash, crc32 trailer) of one frame whose payload is the parts joined."""
    crc = zlib.crc32(header)
    for part in payload_parts:
        crc = zlib.crc32(part, crc)
    return frame_hash(header, *payload_parts), CRC.pack(crc)


def data_payload_head(session_id: int, direction: Direction) -> bytes:
    return DATA_HEAD.pack(session_id, direction)


def segment_name(first_seq: int) -> str:
    return f"{first_seq:020d}.seg"
