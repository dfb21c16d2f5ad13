"""Append-only evidence store: framed, checksummed, hash-chained records in
segment files. The store knows nobody: it imports nothing from the rest of
the agent.
"""

from agent.store.format import Kind, Record, Direction
from agent.store.writer import StoreWriter, StoreError
from agent.store.reader import iter_records, StoreCorrupt

__all__ = ["Kind", "Record", "Direction", "StoreWriter", "StoreError",
           "iter_records", "StoreCorrupt"]
