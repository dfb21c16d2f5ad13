"""Append-only evidence store: framed, checksummed, hash-chained records in
segment files, sealed with a forward-secure key. The store knows nobody: it
imports nothing from the rest of the agent but its append point in C
(agent/native), which the relay threads share.

format   the frame and record kinds        writer   append, rotate, recover, seal
reader   frames back, torn-tail scan        commit   group fsync for asyncio callers
keys     the one-way sealing key ratchet    seal     what a SEAL record says
verify   prove a store whole, off the host  gc       retention, recorded
immutable  FS_IMMUTABLE_FL on finished segments
"""

from agent.store.format import Kind, Record, Direction
from agent.store.writer import StoreWriter, StoreError
from agent.store.reader import iter_records, StoreCorrupt
from agent.store.verify import VerifyReport, Failure, verify
from agent.store.keys import SealKey, SealKeyError, init_key, load_verification_key
from agent.store.gc import gc, gc_event

__all__ = ["Kind", "Record", "Direction", "StoreWriter", "StoreError",
           "iter_records", "StoreCorrupt", "VerifyReport", "Failure", "verify",
           "SealKey", "SealKeyError", "init_key", "load_verification_key", "gc", "gc_event"]
