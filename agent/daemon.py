"""Starts and supervises the parts, in data-path order, and stops them.

Start: store -> rules -> proxy -> (DNS, witness) -> control socket -> ready.
Rules are applied before the proxy listens: from that moment the subject's
connections are refused, not let through, until the proxy takes them; and
they stay in the kernel when the agent stops or dies (fail closed).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from agent import __version__, conntrack, sdnotify
from agent.alerts import AlertType, make_alert
from agent.config import Config
from agent.control import StoreLock, serve
from agent.enforce import Nft, render
from agent.enforce import apply as rules
from agent.enforce.monitor import RulesetChanges
from agent.proxy import attribution, dns, handover
from agent.proxy.policy import Policy
from agent.proxy.handoff import Handoff
from agent.proxy.server import STORE_FAILING, Proxy
from agent.proxy.sessions import Session, SessionTable
from agent.readcache import READ_TTL_S
from agent.store import Kind, StoreWriter

if TYPE_CHECKING:
    from agent.witness.connections import ConnectTable

log = logging.getLogger("tollgate.daemon")


KERNEL_ATTRIBUTION_WAIT_S = 0.05  # the witness's event normally arrives within a millisecond
# When /proc cannot name the client either (it has closed already), the
# kernel's event is the only evidence left: wait longer for a starved witness.
KERNEL_LATE_WAIT_S = 2.0
HEAP_TRIM_INTERVAL_S = 5.0
MAX_NAMING = 256   # refused-unrecorded connections being named at once
FromProc = Callable[[tuple[str, int]], Awaitable[dict]]
BeforeNat = Callable[[tuple[str, int]], Awaitable["tuple[str, int] | None"]]


async def kernel_then_proc(connects: ConnectTable, client: tuple[str, int],
                           dst: tuple[str, int], from_proc: FromProc,
                           before_nat: BeforeNat) -> dict:
    """From the witness's connect event when it has one (cheap, and names
    even a process that has exited); if it has none, the subject's socket
    may have had another port than the proxy saw (conntrack changed it on
    the way: agent/conntrack.py), and is looked for by its own; else from
    sock_diag and /proc; and when those find the client gone too, from the
    kernel's event once more, which a busy host may deliver after the first
    wait (the session would otherwise be recorded without anyone behind it)."""
    info = await connects.attribution(client, dst, KERNEL_ATTRIBUTION_WAIT_S)
    if info is not None:
        return info
    own = await before_nat(client)
    if own is not None:
        return _sent_from(own, await kernel_then_proc(connects, own, dst, from_proc, _unchanged))
    info = await from_proc(client)
    if "uid" in info:
        return info
    late = await connects.attribution(client, dst, KERNEL_LATE_WAIT_S)
    return info if late is None else {**late, "proc_error": info.get("error")}


async def proc_only(client: tuple[str, int], from_proc: FromProc, before_nat: BeforeNat) -> dict:
    """Without the witness: sock_diag and /proc, by the socket's own port if
    the proxy's finds nothing and conntrack changed it."""
    info = await from_proc(client)
    if "uid" in info:
        return info
    own = await before_nat(client)
    return info if own is None else _sent_from(own, await from_proc(own))


def _sent_from(own: tuple[str, int], info: dict) -> dict:
    """The attribution, saying the socket's own address where the proxy saw another."""
    return {**info, "client_before_nat": list(own)}


async def _unchanged(client: tuple[str, int]) -> None:
    return None


class StartError(Exception):
    """The agent cannot start; one line for the operator."""


def ruleset_for(cfg: Config):
    return render(cfg.enforce.table, cfg.subject_uids(), cfg.proxy.port,
                  cfg.dns.port if cfg.dns.enabled else None)


def data_plane(cfg: Config) -> str:
    """"native" or "python": what proxy.data_plane "auto" comes to."""
    plane = cfg.proxy.data_plane
    if plane == "auto":
        return "python" if cfg.store.durability == "fsync" else "native"
    return plane


def _raise_fd_limit() -> None:
    """Four descriptors per relayed session (two sockets, and each direction's
    own for sending): outside systemd (LimitNOFILE) the soft limit may be 1024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


STOPPED_NOT_RESTARTED = ("agent stopped: handed over, but the service was stopped, not restarted "
                         "(systemd reset its sockets)")


class Agent:
    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.started_ns = time.time_ns()
        self.sessions = SessionTable()
        self.nft = Nft()
        self.ruleset = ruleset_for(cfg)
        # Names resolve through /etc/passwd: once, here, not on every connection.
        self.uids = self.ruleset.subject_uids
        self.enforcing = True
        self.store_healthy = True
        self.stopping = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self._naming: set[asyncio.Task] = set()   # unrecorded refusals being named
        self.counters = {"rules_restored": 0}
        # Sessions the last run handed over: relayed on, or closed (handover.py).
        self.taken_over = {"resumed_at_start": 0, "not_resumed_at_start": 0}
        self.connects = None  # the witness's view of who connected, when it runs

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        cfg = self.cfg
        _raise_fd_limit()
        self.lock = StoreLock(cfg.store.path)
        if not self.lock.acquire():
            raise StartError(f"{cfg.store.path}: another tollgate agent is writing this store")
        try:
            self.store = StoreWriter.from_config(cfg.store)
        except Exception as e:
            raise StartError(f"{cfg.source}: store: {e}") from None
        self.durable = self._group_commit()
        # What held while this agent recorded, for a reviewer (`tollgate runs`).
        self._event("agent_start", version=__version__, pid=os.getpid(), config=cfg.source,
                    subjects=list(cfg.subjects), uids=list(self.uids),
                    witness=cfg.witness.enabled, sealed=self.store.seal_key is not None,
                    durability=cfg.store.durability, data_plane=data_plane(cfg))
        if self.store.seal_key is None:
            # The chain alone is no proof against root: it can be recomputed.
            self._alert(AlertType.STORE_UNSEALED,
                        f"no sealing key at {cfg.store.key_path}: what this agent records is "
                        "not sealed (run `tollgate keys init`, then restart)",
                        key_path=cfg.store.key_path)
        self._apply_rules("start")
        own = {(a, cfg.proxy.port) for a in cfg.proxy.listen}
        self.proxy = Proxy(store=self.store, sessions=self.sessions, hooks=self,
                           policy=Policy.build(cfg.proxy.deny, cfg.proxy.allow, own),
                           durable=self.durable, buffer_bytes=cfg.proxy.buffer_bytes,
                           connect_timeout_s=cfg.proxy.connect_timeout_s,
                           stop_grace_s=cfg.proxy.stop_grace_s)
        self.handoff = self._handoff()
        try:
            await (self.handoff or self.proxy).listen(cfg.proxy.listen, cfg.proxy.port)
        except OSError as e:
            raise StartError(f"{cfg.source}: proxy.port: {e.strerror}") from None
        self._resume_handed_over()
        sdnotify.drop_unclaimed()
        self.dns = await self._start_dns()
        self.witness = self._start_witness()
        self.shipper = self._start_shipper()
        self.control = await serve(cfg.run_dir, self.handle)
        self.tasks.append(asyncio.create_task(self._watch_rules()))
        self.tasks.append(asyncio.create_task(_trim_heap()))
        log.info("ready: rules applied, proxy on port %d, subjects %s",
                 cfg.proxy.port, ",".join(cfg.subjects))
        sdnotify.notify("READY=1\nSTATUS=recording")

    def _handoff(self) -> Handoff | None:
        """The native data plane, unless the config asks for the asyncio relay."""
        cfg = self.cfg
        if data_plane(cfg) == "python":
            return None
        if cfg.store.durability == "fsync":
            raise StartError(f'{cfg.source}: proxy.data_plane: "native" cannot wait for fsync'
                             f' per chunk; use "auto" or "python" with store.durability "fsync"')
        from agent.native import Opener, Pump
        threads = cfg.proxy.relay_threads or min(os.cpu_count() or 1, 4)
        pump = Pump(self.store.chain, threads, cfg.proxy.buffer_bytes, cfg.proxy.connect_timeout_s)
        opener = Opener(pump, self.store.chain, linger_s=self.sessions.linger_s,
                        name_ttl_s=READ_TTL_S)
        self.sessions.also = opener.knows   # the cross-check asks about its sessions too
        return Handoff(self.proxy, pump, opener)

    def _start_witness(self):
        """The kernel's own view; without it a bypass would go unseen, so an
        enabled witness that cannot attach stops the start."""
        if not self.cfg.witness.enabled:
            return None
        from agent.witness import Witness, WitnessUnavailable
        w = Witness(self.cfg, self.store, self.sessions)
        try:
            w.start()
        except WitnessUnavailable as e:
            raise StartError(f"{self.cfg.source}: witness: {e} (set witness.enabled = false "
                             "to run without it)") from None
        _give_back_compiler_memory()
        from agent.witness.connections import ConnectTable
        self.connects = ConnectTable(w.procs, kernel=w.probes.attributed)
        w.subscribe(self.connects.on_event)
        if self.handoff is not None and w.probes.attributed_fd >= 0:
            self.handoff.open_in_c(w.probes.attributed_fd, w.procs)
        self._event("witness_attached", **{k: v for k, v in w.statistics().items()
                                           if k in ("attached", "guard")})
        return w

    def _start_shipper(self):
        """The copy off the host runs in its own threads; it reads the store's
        files and never slows the relay."""
        if not self.cfg.ship.enabled:
            return None
        import threading
        from agent.ship import Shipper
        shipper = Shipper(self.cfg, self.cfg.store.path, alerts=self.store,
                          head_seq=lambda: self.store.head[0])
        self.ship_stop = threading.Event()
        threading.Thread(target=shipper.run_forever, args=(self.ship_stop,), daemon=True,
                         name="shipper").start()
        return shipper

    async def _start_dns(self) -> list:
        cfg = self.cfg
        if not cfg.dns.enabled:
            return []
        resolver = cfg.dns.resolver or dns.system_resolver()
        if not resolver:
            raise StartError(f"{cfg.source}: dns.resolver: not set and /etc/resolv.conf "
                             "names no nameserver")
        make = lambda: dns.DnsRecorder(self.store, resolver, self.attribute_udp,
                                       self.store_failed)
        try:
            return await dns.listen(cfg.proxy.listen, cfg.dns.port, make)
        except OSError as e:
            raise StartError(f"{cfg.source}: dns.port: {e.strerror}") from None

    def _group_commit(self):
        if self.cfg.store.durability != "fsync":
            return None
        from agent.store.commit import GroupCommit
        commit = GroupCommit(self.store, self.cfg.store.fsync_interval_ms)
        commit.start()
        return commit

    async def stop(self, reason: str) -> None:
        sdnotify.notify("STOPPING=1")
        for t in self.tasks:
            t.cancel()
        why = f"agent stopping: {reason}"
        if self.handoff is not None:
            self._hand_over(await self.handoff.close(why, hand_over=handover.most()), why)
        else:
            await self.proxy.close(why)
        if self.witness is not None:
            self.witness.stop()
        if self.shipper is not None:
            self.ship_stop.set()
        self.control.close()
        self._event("agent_stop", reason=reason, rules_left_in_place=self.enforcing)
        if self.durable is not None:
            await self.durable.aclose()
        self.store.close()
        self.lock.release()

    def _hand_over(self, handed: list[handover.Handed], why: str) -> None:
        """The sessions still open go to the next agent (handover.py)."""
        if not handed:
            return
        try:
            handover.give(handed, self.cfg.store.path)
        except OSError as e:
            log.error("cannot hand sessions over, resetting them: %s", e)
            for h in handed:
                handover.reset(h)
            self.proxy.close_records([(h.session, why, h.client_bytes, h.server_bytes)
                                      for h in handed])
            return
        # Per session, bytes recorded and not yet sent, which the next run sends.
        pending = {str(h.sid): [len(p) for p in h.pending] for h in handed if any(h.pending)}
        self._event("sessions_handed_over", sessions=[h.sid for h in handed], pending=pending)

    def _resume_handed_over(self) -> None:
        """The sessions the last agent handed over: relayed on, or closed
        with the reason (no sockets came: the service was stopped, not
        restarted, and systemd reset them then; or this agent cannot). The
        event comes first, so it precedes what the resumed sessions record."""
        handed, stopped_ns = handover.take(self.cfg.store.path)
        if not handed:
            return
        cannot = None if self.handoff is not None else "this agent relays with the asyncio data plane"
        taking, rest = [], []
        for h in handed:
            (taking if h.fds is not None and cannot is None else rest).append(h)
        self._event("sessions_resumed", sessions=sorted(h.sid for h in taking),
                    not_resumed=sorted(h.sid for h in rest))
        left = self.handoff.resume(taking) if taking else []
        left += [(h, cannot or "no sockets came") for h in rest]
        stopped = [(h.session, STOPPED_NOT_RESTARTED, h.client_bytes, h.server_bytes)
                   for h, _ in left if h.fds is None]
        refused = [(h.session, f"agent restarted: handed over, not resumed: {why}",
                    h.client_bytes, h.server_bytes) for h, why in left if h.fds is not None]
        for h, _ in left:
            handover.reset(h)
        handover.release(handed)
        self.proxy.close_records(stopped, ended_ns=stopped_ns)
        self.proxy.close_records(refused)
        self.taken_over = {"resumed_at_start": len(handed) - len(left),
                           "not_resumed_at_start": len(left)}
        handover.forget(self.cfg.store.path)

    def _event(self, what: str, **fields: Any) -> None:
        if self.store.defer_json(Kind.EVENT, {"event": what, **fields}) is None:
            self.store_failed(RuntimeError(self.store.last_error or "append failed"))

    # -- rules -----------------------------------------------------------------------

    def _apply_rules(self, why: str) -> None:
        try:
            rules.apply(self.nft, self.ruleset)
        except Exception as e:
            raise StartError(f"cannot apply nftables rules: {e}") from None
        self._event("rules_applied", why=why, table=self.ruleset.table,
                    subjects=list(self.ruleset.subject_uids), proxy_port=self.ruleset.proxy_port)

    async def _watch_rules(self) -> None:
        """Any change to our table is tampering: alert, then put it back.

        The kernel's notice of any ruleset change starts a look at once
        (enforce/monitor.py); every enforce.watch_interval_s without one,
        a look anyway. The table is read in a thread with its own netlink
        context, so the relay never waits on it; alerting and restoring
        happen back on the loop, after `enforcing` is looked at again, so an
        operator's removal made meanwhile is never undone. A restore that
        fails is said once and tried again every round: the watch itself
        must not end.
        """
        changed, changes = self._notified_changes()
        try:
            await self._watch_rules_on(Nft(), changed)
        finally:
            if changes is not None:
                asyncio.get_running_loop().remove_reader(changes.fileno())
                changes.close()

    def _notified_changes(self) -> tuple[asyncio.Event, RulesetChanges | None]:
        """An event the kernel's ruleset notifications set (never, if they
        cannot be had: the interval alone then)."""
        changed = asyncio.Event()
        try:
            changes = RulesetChanges()
        except OSError as e:
            log.warning("no nftables notifications (%s): the table is read every %s s", e,
                        self.cfg.enforce.watch_interval_s)
            return changed, None

        loop = asyncio.get_running_loop()

        def on_notice() -> None:
            changed.set()
            try:
                changes.drain()
            except OSError as e:   # not to spin on a broken socket: the interval goes on
                log.warning("nftables notifications failed (%s): the table is read every "
                            "%s s", e, self.cfg.enforce.watch_interval_s)
                loop.remove_reader(changes.fileno())
        loop.add_reader(changes.fileno(), on_notice)
        return changed, changes

    async def _watch_rules_on(self, watch_nft: Nft, changed: asyncio.Event) -> None:
        restore_failing = False
        while True:
            try:
                await asyncio.wait_for(changed.wait(), self.cfg.enforce.watch_interval_s)
            except asyncio.TimeoutError:
                pass
            changed.clear()
            if not self.enforcing:
                continue
            try:
                problems = await asyncio.to_thread(rules.verify, watch_nft, self.ruleset)
            except Exception as e:
                problems = [f"cannot read the table: {e}"]
            if not problems or not self.enforcing:
                continue
            if not restore_failing:
                self._alert(AlertType.RULES_TAMPERED, "tollgate's nftables table was changed",
                            problems=problems, table=self.ruleset.table)
            try:
                rules.apply(self.nft, self.ruleset)
            except Exception as e:
                if not restore_failing:
                    log.error("cannot restore the nftables rules (trying again): %s", e)
                    self._event("rules_restore_failed", error=str(e))
                restore_failing = True
                continue
            restore_failing = False
            self.counters["rules_restored"] += 1
            self._event("rules_applied", why="restored after tampering")

    # -- hooks the proxy calls -------------------------------------------------------

    def _opened_in_c(self) -> int:
        """Sessions the native opener named from the kernel's event itself."""
        return self.handoff.opener.statistics()["opened"] if self.handoff else 0

    def attribute_now(self, client: tuple[str, int], dst: tuple[str, int]) -> dict | None:
        """attribute() without waiting, when the witness already has the event."""
        if self.connects is None:
            return None
        found = self.connects.attribution_now(client, dst)
        # The subject's side established before the proxy's could be accepted,
        # so its event is in the ring buffer: read it here rather than wait
        # for the witness's thread to be scheduled and hand it over.
        if found is None and self.witness.probes.drain():
            found = self.connects.attribution_now(client, dst)
        return found

    async def attribute(self, session: Session) -> dict:
        return await self._attribute(session.client, session.original_dst)

    async def _attribute(self, client: tuple[str, int], dst: tuple[str, int]) -> dict:
        from_proc = functools.partial(self._from_proc, dst=dst, protocol=socket.IPPROTO_TCP)
        if self.connects is None:
            return await proc_only(client, from_proc, self._before_nat)
        return await kernel_then_proc(self.connects, client, dst, from_proc, self._before_nat)

    async def _before_nat(self, client: tuple[str, int]) -> tuple[str, int] | None:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, conntrack.as_sent, client, self.cfg.proxy.port)

    async def attribute_udp(self, client: tuple[str, int], dst: tuple[str, int]) -> dict:
        return await self._from_proc(client, dst, socket.IPPROTO_UDP)

    async def _from_proc(self, client: tuple[str, int], dst: tuple[str, int],
                         protocol: int) -> dict:
        """sock_diag and /proc, in a worker thread: it must not stall the relay."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(None, attribution.attribute, client, dst,
                                          self.uids, protocol)

    def refused(self, session: Session, why: str) -> None:
        kind = AlertType.POLICY_DENIED if self.store_healthy else AlertType.PROXY_REFUSED
        self._refusal(kind, session.client, session.original_dst, why, session.info,
                      session=session.id)

    def _refusal(self, kind: AlertType, client: tuple[str, int], dst: tuple[str, int],
                 why: str, info: dict, **more: Any) -> None:
        """The alert for a connection the proxy refused, naming who tried."""
        self._alert(kind, f"connection to {dst[0]}:{dst[1]} refused: {why}", **more,
                    client=client, original_dst=dst, reason=why, probe="proxy", **_who(info))

    def unrecorded(self, client: tuple[str, int], dst: tuple[str, int],
                   info: dict | None) -> None:
        """Who tried to connect where while the store could not record it: a
        proxy_refused alert, kept in memory until the store appends again.
        Named first (the kernel's event, else /proc) off the accept path; a
        burst beyond MAX_NAMING at once goes unnamed rather than queue."""
        if info is not None or len(self._naming) >= MAX_NAMING:
            self._refusal(AlertType.PROXY_REFUSED, client, dst, STORE_FAILING,
                          info or {"error": "not named: too many at once"})
            return
        task = asyncio.get_running_loop().create_task(self._name_unrecorded(client, dst))
        self._naming.add(task)
        task.add_done_callback(self._naming.discard)

    async def _name_unrecorded(self, client: tuple[str, int], dst: tuple[str, int]) -> None:
        try:
            info = await self._attribute(client, dst)
        except Exception as e:    # the refusal is evidence even unnamed
            info = {"error": f"not named: {e}"}
        self._refusal(AlertType.PROXY_REFUSED, client, dst, STORE_FAILING, info)

    def store_failed(self, error: Exception) -> None:
        """Fail closed: refuse new sessions until the store takes appends again.
        The alert waits in the writer's memory and is written when it can be."""
        if not self.store_healthy:
            return
        self.store_healthy = False
        self.proxy.accepting = False
        log.error("store failed, refusing subject connections: %s", error)
        self.store.defer_json(Kind.ALERT, make_alert(
            AlertType.STORE_FAILED, "store append failed; sessions cut and new ones refused",
            error=str(error)))
        self.tasks.append(asyncio.get_running_loop().create_task(self._recover_store()))

    async def _recover_store(self) -> None:
        while not await asyncio.to_thread(self.store.probe):
            await asyncio.sleep(1.0)
        self.store_healthy = True
        self.proxy.accepting = True
        log.info("store appends again; accepting subject connections")

    def _alert(self, kind: AlertType, summary: str, **evidence: Any) -> None:
        alert = make_alert(kind, summary, **evidence)
        log.warning("alert %s %s: %s", alert["id"], alert["type"], summary)
        if self.store.defer_json(Kind.ALERT, alert) is None:
            self.store_failed(RuntimeError(self.store.last_error or "append failed"))

    # -- control socket ----------------------------------------------------------------

    async def handle(self, req: dict, peer: dict) -> dict:
        op = req.get("op")
        if op == "status":
            return {"ok": True, "status": self.statistics()}
        if op == "rules_remove":
            self.enforcing = False
            self._alert(AlertType.RULES_REMOVED, "operator removed tollgate's rules",
                        by=peer, reason=req.get("reason", ""))
            removed = rules.remove(self.nft, self.ruleset.table)
            return {"ok": True, "removed": removed}
        if op == "rules_apply":
            self._apply_rules(f"operator {peer.get('user')}")
            self.enforcing = True
            return {"ok": True}
        if op == "record" and req.get("kind") in ("ACCESS", "ACK", "EVENT"):
            seq = self.store.append_json(Kind[req["kind"]], {**req["record"], "by": peer})
            return {"ok": True, "seq": seq}
        return {"ok": False, "error": f"unknown request {op!r}"}

    def statistics(self) -> dict:
        return {"version": __version__, "pid": os.getpid(),
                "uptime_s": round((time.time_ns() - self.started_ns) / 1e9, 1),
                "enforcing": self.enforcing, "store_healthy": self.store_healthy,
                "rules": {"table": self.ruleset.table, **self.counters,
                          **_safe(rules.counters, self.nft, self.ruleset.table)},
                "proxy": {**self.proxy.statistics(),
                          **(self.handoff.statistics() if self.handoff else {}),
                          "data_plane": "native" if self.handoff else "python"},
                "dns": [r.stats for r in self.dns],
                "witness": self.witness.statistics() if self.witness else "disabled",
                "attribution": ({"kernel_hits": self.connects.hits + self._opened_in_c(),
                                 "proc_fallbacks": self.connects.misses}
                                if self.connects else "sock_diag"),
                "ship": _safe(lambda: _plain(self.shipper.statistics())) if self.shipper
                else "disabled",
                "sessions": {**self.sessions.statistics(), **self.taken_over},
                "store": self.store.statistics()}


def _safe(fn, *args) -> dict:
    try:
        return fn(*args)
    except Exception as e:
        return {"error": str(e)}


async def _trim_heap() -> None:
    """Bulk sessions raise glibc's heap to their high-water mark (chunks in
    flight, transport buffers) and glibc keeps it after they end; give the
    free part back every few seconds, in a thread (it walks the heap)."""
    libc = _libc()
    if libc is None:
        return
    while True:
        await asyncio.sleep(HEAP_TRIM_INTERVAL_S)
        await asyncio.to_thread(libc.malloc_trim, 0)


def _libc():
    import ctypes
    try:
        return ctypes.CDLL("libc.so.6", use_errno=True)
    except OSError as e:
        log.debug("no libc.so.6 to trim the heap with: %s", e)
        return None


def _give_back_compiler_memory() -> None:
    """BCC compiled the probes with LLVM in this process and will not again.
    glibc keeps the freed heap unless asked (malloc_trim), and the compiler's
    code pages (~80 MiB) stay resident until the kernel is told it may drop
    them (MADV_PAGEOUT: clean file pages, faulted back in if ever touched)."""
    import ctypes
    libc = _libc()
    if libc is None:
        return
    try:
        libc.malloc_trim(0)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open("/proc/self/maps") as maps:
            for lo, hi in _compiler_mappings(maps):
                libc.madvise(lo, hi - lo, MADV_PAGEOUT)
    except (OSError, AttributeError) as e:
        log.debug("could not give back compiler memory: %s", e)


MADV_PAGEOUT = 21
_COMPILER_LIBS = ("libLLVM", "libclang-cpp")


def _compiler_mappings(maps) -> list[tuple[int, int]]:
    out = []
    for line in maps:
        parts = line.split()
        if len(parts) >= 6 and any(lib in parts[5] for lib in _COMPILER_LIBS):
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi))
    return out


def _who(info: dict) -> dict:
    """The attribution fields an alert carries as evidence."""
    keys = ("uid", "pid", "comm", "cgroup_id", "netns_inode", "chain", "error")
    return {k: info[k] for k in keys if k in info}


def _plain(stats) -> dict:
    import dataclasses
    return dataclasses.asdict(stats) if dataclasses.is_dataclass(stats) else dict(stats)


async def _main(cfg: Config) -> None:
    agent = Agent(cfg)
    await agent.start()
    loop = asyncio.get_running_loop()
    stop_reason: list[str] = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, lambda s=sig: (stop_reason.append(s.name),
                                                    agent.stopping.set()))
    await agent.stopping.wait()
    await agent.stop(stop_reason[0] if stop_reason else "stopped")


def run(cfg: Config) -> None:
    # Attribution walks /proc in worker threads; with the default 5 ms GIL
    # switch interval each walk could hold the relay's thread off for that long.
    sys.setswitchinterval(0.0005)
    with asyncio.Runner(loop_factory=_loop_factory(cfg.proxy.event_loop)) as runner:
        runner.run(_main(cfg))


def _loop_factory(name: str):
    if name == "asyncio":
        return None
    import uvloop
    return uvloop.new_event_loop
