"""Send one batch until every entry is written or kept locally.

Transient failures: the Backoff retries the whole batch (resent entries keep
their insertId and timestamp, so Cloud Logging folds them). INVALID_ARGUMENT
with per-entry errors (partial_success): the other entries are already
written; the refused ones are quarantined and replaced by tombstones.
INVALID_ARGUMENT without them: bisect until the bad entry is alone. Any other
error propagates: the cursor stays put and the batch is sent again later.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field

from google.api_core import exceptions as gexc
from google.cloud.logging_v2.types import logging as logging_types
from google.rpc import code_pb2

from agent.ship.entries import TOMBSTONE_SUFFIX, tombstone
from agent.ship.quarantine import Quarantine
from agent.ship.retry import Backoff, Stopped
from agent.ship.transport import LogWriter

log = logging.getLogger("tollgate.ship")

PartialErrors = logging_types.WriteLogEntriesPartialErrors.pb()


@dataclass
class Counters:
    """Shared by the lanes; read through Shipper.statistics()."""
    entries: int = 0
    requests: int = 0
    retries: int = 0
    rejected: int = 0
    errors: int = 0
    last_error: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **deltas: int) -> None:
        with self.lock:
            for name, n in deltas.items():
                setattr(self, name, getattr(self, name) + n)

    def failed(self, e: Exception) -> None:
        with self.lock:
            self.errors += 1
            self.last_error = f"{type(e).__name__}: {e}"[:500]


class Sender:
    def __init__(self, writer: LogWriter, backoff: Backoff, quarantine: Quarantine,
                 counters: Counters):
        self._writer, self._backoff = writer, backoff
        self._quarantine, self._counters = quarantine, counters

    def send(self, entries: list) -> None:
        pending = entries
        while pending:
            pending = self._attempt(pending)

    def _attempt(self, entries: list) -> list:
        """Write entries; returns those to send again (per-entry transient)."""
        try:
            self._backoff.call(lambda: self._write(entries), self._retrying)
            self._counters.add(entries=len(entries))
            return []
        except gexc.GoogleAPICallError as e:
            errors = partial_errors(e)
            if errors:
                return self._per_entry(entries, errors)
            if isinstance(e, gexc.InvalidArgument):
                self._bisect(entries, e)
                return []
            self._counters.failed(e)
            raise

    def _write(self, entries: list) -> None:
        self._counters.add(requests=1)
        self._writer.write(entries)

    def _retrying(self, e: Exception, delay: float) -> None:
        self._counters.add(retries=1)
        self._counters.failed(e)
        log.info("write failed (%s), retrying in %.1fs", type(e).__name__, delay)

    def _per_entry(self, entries: list, errors: dict[int, tuple[int, str]]) -> list:
        refused = [(entries[i], msg) for i, (code, msg) in errors.items()
                   if code == code_pb2.INVALID_ARGUMENT]
        again = [entries[i] for i, (code, _) in sorted(errors.items())
                 if code != code_pb2.INVALID_ARGUMENT]
        self._counters.add(entries=len(entries) - len(errors))
        self._refuse(refused)
        if again and self._backoff.sleep(next(self._backoff.delays())):
            raise Stopped()
        return again

    def _bisect(self, entries: list, e: gexc.GoogleAPICallError) -> None:
        if len(entries) == 1:
            self._refuse([(entries[0], e.message or str(e))])
            return
        mid = len(entries) // 2
        self.send(entries[:mid])
        self.send(entries[mid:])

    def _refuse(self, refused: list) -> None:
        """Keep each refused entry locally and send a tombstone for it."""
        tombstones = []
        for entry, msg in refused:
            ts_ns = self._quarantine.keep(entry, msg)
            self._counters.add(rejected=1)
            log.error("entry %s refused (%s): kept in %s", entry.insert_id, msg,
                      self._quarantine.dir)
            # A refused tombstone is kept but not replaced: that would not end.
            if not entry.insert_id.endswith(TOMBSTONE_SUFFIX):
                record_hash = entry.json_payload.fields["hash"].string_value
                tombstones.append(tombstone(entry, record_hash, msg, ts_ns))
        if tombstones:
            self.send(tombstones)


def partial_errors(e: gexc.GoogleAPICallError) -> dict[int, tuple[int, str]]:
    """{entry index: (code, message)} from WriteLogEntriesPartialErrors details."""
    found: dict[int, tuple[int, str]] = {}
    for detail in e.details or ():
        if hasattr(detail, "Is") and detail.Is(PartialErrors.DESCRIPTOR):
            pe = PartialErrors()
            detail.Unpack(pe)
            for index, status in pe.log_entry_errors.items():
                found[index] = (status.code, status.message)
    return found
