"""The shipper: two lanes over one store, a backlog watch, statistics().

run_once() ships what is in the store now (`tollgate ship --once`);
run_forever(stop) runs each lane in its own thread and watches the age of
the oldest unshipped record, raising a SHIP_BACKLOG alert (into the store,
so it is shipped once the path is back) when it passes max_backlog_age_s.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from agent.alerts import AlertType, Appender, record_alert
from agent.config import Config
from agent.ship.cursor import Cursor
from agent.ship.entries import PRIORITY_KINDS, Target
from agent.ship.lane import Lane, LaneStatistics
from agent.ship.quarantine import Quarantine
from agent.ship.resource import gce_resource
from agent.ship.retry import Backoff, Stopped
from agent.ship.sender import Counters, Sender
from agent.ship.sessions import Subjects
from agent.ship.transport import LogWriter

log = logging.getLogger("tollgate.ship")


@dataclass(frozen=True, slots=True)
class ShipResult:
    records: int   # records shipped by this call
    entries: int   # entries written (split parts, tombstones included)
    rejected: int  # entries refused and kept locally by this call


@dataclass(frozen=True, slots=True)
class ShipStatistics:
    backlog_records: int
    backlog_bytes: int
    oldest_age_s: float | None
    shipped_entries: int
    requests: int
    retries: int
    rejected: int
    errors: int
    last_error: str
    backlog_alerted: bool
    lanes: tuple[LaneStatistics, ...]


class Shipper:
    def __init__(self, config: Config, store_dir: str | os.PathLike, *,
                 state_dir: str | os.PathLike | None = None,
                 alerts: Appender | None = None,
                 head_seq: Callable[[], int] | None = None,
                 clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], bool | None] | None = None):
        """alerts: where a backlog alert is appended (the daemon's writer);
        head_seq: the store's last seq, for an exact backlog count;
        clock/sleep: injectable so tests can warp time."""
        cfg = config.ship
        self._cfg, self._dir = cfg, Path(store_dir)
        self._alerts, self._head_seq, self._clock = alerts, head_seq, clock
        self._stop = threading.Event()
        state = Path(state_dir or cfg.state_dir)
        state.mkdir(mode=0o700, parents=True, exist_ok=True)
        self._lock_fd = _lock_state(state)
        store_id = _store_id(self._dir)
        rtype, rlabels = gce_resource(cfg)
        target = Target(cfg.project_id, cfg.log_name, cfg.alert_log_name, cfg.seal_log_name,
                        rtype, rlabels, socket.gethostname(), store_id)
        self.counters = Counters()
        self._writer = LogWriter(cfg)
        backoff = Backoff(cfg.retry_initial_s, cfg.retry_max_s, sleep=sleep or self._stop.wait)
        quarantine = Quarantine(state / "quarantine", lambda: int(clock() * 1e9))
        sender = Sender(self._writer, backoff, quarantine, self.counters)
        self._backlog_alerted = False
        self.lanes = tuple(
            Lane(name, self._dir, Cursor(state / f"cursor-{name}.json", store_id), wants,
                 target, sender, Subjects(self._dir), cfg.batch_entries, cfg.batch_bytes)
            for name, wants in (("priority", lambda r: r.kind in PRIORITY_KINDS),
                                ("main", lambda r: r.kind not in PRIORITY_KINDS)))

    def run_once(self) -> ShipResult:
        """Ship everything in the store now: seals and alerts first."""
        before = (self.counters.entries, self.counters.rejected)
        records = sum(lane.run_once() for lane in self.lanes)
        self.check_backlog()
        return ShipResult(records, self.counters.entries - before[0],
                          self.counters.rejected - before[1])

    def run_forever(self, stop: threading.Event) -> None:
        """Ship until stop is set; each lane in its own thread."""
        threads = [threading.Thread(target=self._lane_loop, args=(lane, stop),
                                    name=f"ship-{lane.name}", daemon=True)
                   for lane in self.lanes]
        for t in threads:
            t.start()
        while not stop.wait(self._cfg.poll_interval_s):
            self.check_backlog()
        self._stop.set()  # ends backoff waits
        for t in threads:
            t.join()

    def _lane_loop(self, lane: Lane, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                lane.run_once()
            except Stopped:
                return
            except Exception as e:  # noqa: BLE001 - never give up; say why, wait, retry
                self.counters.failed(e)
                log.exception("ship lane %s failed; retrying", lane.name)
            stop.wait(self._cfg.poll_interval_s)

    def check_backlog(self) -> bool:
        """Alert once per episode when the oldest unshipped record is too old."""
        age = self.statistics().oldest_age_s
        if age is None or age <= self._cfg.max_backlog_age_s:
            self._backlog_alerted = False
            return False
        if not self._backlog_alerted and self._alerts is not None:
            stats = self.statistics()
            record_alert(self._alerts, AlertType.SHIP_BACKLOG,
                         f"oldest unshipped record is {age:.0f}s old",
                         backlog_records=stats.backlog_records,
                         backlog_bytes=stats.backlog_bytes, oldest_age_s=age,
                         last_error=stats.last_error)
        self._backlog_alerted = True
        return True

    def statistics(self) -> ShipStatistics:
        head = self._head_seq() if self._head_seq else None
        lanes = tuple(lane.statistics(head) for lane in self.lanes)
        main = lanes[-1]
        oldest = [s.oldest_ts_ns for s in lanes if s.oldest_ts_ns is not None]
        c = self.counters
        return ShipStatistics(
            backlog_records=max(0, max(s.seen_seq for s in lanes) + 1
                                - min(s.next_seq for s in lanes)),
            backlog_bytes=main.backlog_bytes,
            oldest_age_s=max(0.0, self._clock() - min(oldest) / 1e9) if oldest else None,
            shipped_entries=c.entries, requests=c.requests, retries=c.retries,
            rejected=c.rejected, errors=c.errors, last_error=c.last_error,
            backlog_alerted=self._backlog_alerted, lanes=lanes)

    def close(self) -> None:
        self._stop.set()
        self._writer.close()
        os.close(self._lock_fd)


class ShipperBusy(Exception):
    """Another shipper (the daemon, or ship --once) uses this state dir."""


def _lock_state(state: Path) -> int:
    """One shipper per state dir, or two would move one cursor at once.

    flock: the kernel drops it when the holder dies, even by kill -9."""
    fd = os.open(state / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ShipperBusy(f"{state}: another shipper is running") from None
    return fd


def _store_id(store_dir: Path) -> str:
    """The store's id, which names its entries (StoreWriter creates it)."""
    try:
        return (store_dir / "store.id").read_text().strip()
    except FileNotFoundError:
        raise FileNotFoundError(f"{store_dir}: no store here (store.id missing)") from None
