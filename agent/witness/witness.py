"""The witness: kernel probes, the cross-check and the sweep, on two threads.

The poll thread drains the ring buffer into the cross-check, takes the
subject sockets the kernel could not prove went into the proxy once their
window has passed (a proxied connection sends no event at all; see
bpf/tcp_connect.c), judges sockets whose window has passed and turns
lost-event counts into `events_lost` records. The sweep thread runs
sock_diag every sweep_interval_s. Both only append to the store
(thread-safe) and read the proxy's session table through SessionLookup;
neither touches the daemon's event loop.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable

from agent import conntrack
from agent.alerts import Appender, AlertType, record_alert
from agent.config import Config
from agent.witness.crosscheck import CrossCheck, SessionLookup
from agent.witness.events import Event
from agent.witness.loader import Probes
from agent.witness.procs import ProcessTable
from agent.witness.sweep import Sweep, netns_of

log = logging.getLogger("tollgate.witness")

IDLE_POLL_MS = 250  # nothing pending: the ring buffer wakes the poll when events come
# How often the kernel's unproven sockets are looked at (Probes.take_unproven)
# while it holds any: a bypass is judged at most this long after its window
# closes. With none held the poll sleeps IDLE_POLL_MS (the kernel wakes it
# when it holds one): at 20 ms always, an idle agent woke 50 times a second.
# After a wake-up the next turn sleeps UNPROVEN_POLL_MS without asking for
# another: every subject connection is held for a moment (until the kernel
# proves it), so re-arming at once woke the poll, and took the GIL from the
# proxy's thread, once a connection on a busy host.
UNPROVEN_POLL_MS = 20
LOST_CHECK_S = 0.25
DNS_PORT = 53
ERROR_ALERT_EVERY_S = 60.0
FAILED_TURN_PAUSE_S = 0.05


class Witness:
    def __init__(self, config: Config, store: Appender, sessions: SessionLookup):
        self.config = config
        self.store = store
        wc = config.witness
        uids = frozenset(config.subject_uids())
        self.procs = ProcessTable(uids.__contains__)
        self.check = CrossCheck(store, sessions, self.procs, window_ms=wc.match_window_ms,
                                udp_allowed_ports=frozenset({DNS_PORT}) if config.dns.enabled
                                else frozenset(),
                                proxy_listen=frozenset(config.proxy.listen),
                                flows=functools.partial(conntrack.flow_of,
                                                        proxy_port=config.proxy.port),
                                own_netns=netns_of(os.getpid()))
        self._listeners: list[Callable[[Event], None]] = []
        self.probes = Probes(uids, pages=wc.perf_pages, guard=wc.guard,
                             on_event=self._dispatch, all_tcp_states=wc.all_tcp_states,
                             proxy_port=config.proxy.port, proxy_listen=config.proxy.listen)
        self.check.kernel_proxied = self.probes.proxied
        self.check.kernel_pending = self.probes.pending
        self.sweep = Sweep(self.check, uids, self.probes.subject_pids)
        self._stop = threading.Event()
        self._woken = False
        self._threads: list[threading.Thread] = []
        self.lost = 0
        self.errors = 0
        self._error_alerted = -ERROR_ALERT_EVERY_S

    def subscribe(self, listener: Callable[[Event], None]) -> None:
        """Also hand every decoded event to listener (on the poll thread; keep it short)."""
        self._listeners.append(listener)

    def _dispatch(self, event: Event) -> None:
        self.check.on_event(event)
        for listener in self._listeners:
            listener(event)

    def start(self) -> None:
        """Compile and attach (raises WitnessUnavailable), then start the threads."""
        self.probes.start()
        self._stop.clear()
        self._threads = [threading.Thread(target=self._poll_loop, name="tollgate-witness",
                                          daemon=True),
                         threading.Thread(target=self._sweep_loop, name="tollgate-sweep",
                                          daemon=True)]
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join()
        self._threads = []
        self.probes.close()

    def _poll_loop(self) -> None:
        next_lost = 0.0
        while not self._stop.is_set():
            try:
                next_lost = self._poll_once(next_lost)
            except Exception as e:   # a failed turn must not blind the witness for good
                self._failed(e)
                self._stop.wait(FAILED_TURN_PAUSE_S)   # a lasting fault must not spin
        self.probes.poll(0)      # what is already in the buffer still counts
        self._take_unproven()
        self.check.tick()
        self._report_lost()

    def _poll_once(self, next_lost: float) -> float:
        # Wake for the next verdict that falls due, not on a fixed beat:
        # an idle witness must not keep taking the relay's GIL.
        short = self._woken or self.probes.holding()   # holding() arms the wake-up
        idle_ms = UNPROVEN_POLL_MS if short else IDLE_POLL_MS
        self._woken = self.probes.poll(self.check.ms_until_due(idle_ms))
        self._take_unproven()
        self.check.tick()
        if time.monotonic() >= next_lost:
            self._report_lost()
            next_lost = time.monotonic() + LOST_CHECK_S
        return next_lost

    def _failed(self, e: Exception) -> None:
        """Logged each time; an alert for the first and then at most one a
        minute, with the count: what was being judged may have been lost."""
        log.exception("witness poll failed")
        self.errors += 1
        now = time.monotonic()
        if now < self._error_alerted + ERROR_ALERT_EVERY_S:
            return
        self._error_alerted = now
        try:
            record_alert(self.store, AlertType.WITNESS_ERROR,
                         f"the witness failed while judging kernel events "
                         f"({type(e).__name__}: {e}); it goes on, but what it was "
                         f"judging may be unjudged",
                         error=f"{type(e).__name__}: {e}", count=self.errors,
                         probe="witness poll thread")
        except Exception:
            log.exception("witness_error alert failed")

    def _take_unproven(self) -> None:
        for event in self.probes.take_unproven(time.monotonic_ns() - self.check.window_ns):
            self._dispatch(event)

    def _report_lost(self) -> None:
        n = self.probes.take_lost()
        if n:
            self.lost += n
            record_alert(self.store, AlertType.EVENTS_LOST,
                         f"{n} kernel events lost: the ring buffer was full",
                         count=n, total=self.lost, probe="ring buffer events",
                         ring_buffer_pages=self.probes.pages)

    def _sweep_loop(self) -> None:
        interval = self.config.witness.sweep_interval_s
        while True:
            try:
                self.sweep.run_once()
            except Exception:    # a failed sweep must not end the witness; counted
                self.sweep.errors += 1
                log.exception("socket sweep failed")
            if self._stop.wait(interval):
                return

    def statistics(self) -> dict:
        return {"events": {k: v for k, v in self.check.counts.items()
                           if k.endswith("Event")},
                "lost": self.lost,
                "errors": self.errors,
                "alerts": {k[len("alert_"):]: v for k, v in self.check.counts.items()
                           if k.startswith("alert_")},
                "sockets": {**{k: v for k, v in self.check.statistics().items()
                               if k.startswith("tcp_") or k == "pending_sockets"},
                            "tcp_proven_in_kernel": self.probes.proven()},
                "attached": list(self.probes.attached),
                "guard": self.probes.guard,
                "ring_buffer_pages": self.probes.pages,
                "handler_errors": self.probes.handler_errors,
                "sweeps": self.sweep.runs, "sweep_errors": self.sweep.errors}
