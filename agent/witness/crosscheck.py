"""Cross-check: every subject TCP socket must be one the proxy accepted.

nftables redirects with DNAT, so the subject's own socket still names the
original destination; the proxy knows each accepted connection by client
address and original destination. A subject socket that reached ESTABLISHED
(or still sits in SYN_SENT, its SYNs leaving the host) and that the proxy
does not know within match_window_ms is a bypass, unless the kernel saw the
proxy accept it (bpf/tcp_connect.c) or conntrack redirected its flow into
the proxy (agent/conntrack.py: the proxy may know it by another source port);
a kernel record that names only its address and port lets it wait for the
proxy's table instead (up to UNBOUND_PROOF_PATIENCE_S). A socket that
closed before it established is a bypass when conntrack still holds its flow
without the redirect: its SYNs (and a Fast Open SYN's data) left the host
unanswered. conntrack forgets a flow refused by a RST at once, so a refused
one is only counted. A socket still connecting when its window ends, whose
events have not named its port yet, waits for one that does.

The other kernel events turn straight into their alerts. on_event() runs on
the witness's poll thread (or the proxy's, when it drains the ring buffer for
a connect event it needs at once) and only files the event; the proxy is
asked once per socket, in tick(), on the poll thread, when the socket's
window has passed.
"""

from __future__ import annotations

import functools
import heapq
import ipaddress
import threading
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from typing import Callable, Protocol

from agent.alerts import Appender, AlertType, record_alert
from agent.conntrack import Flow
from agent.witness.events import (
    AF_INET, Event, ExecEvent, ForkEvent, Header, NetnsEvent, SocketEvent, TcpEvent,
    UdpEvent, UidEvent,
)
from agent.witness.procs import ProcessTable

PROBE_TCP = "tracepoint:sock:inet_sock_set_state"
PROBE_UDP = "tracepoint:sock:sock_send_length"
PROBE_SOCKET = "tracepoint:syscalls:sys_enter_socket+sys_exit_socket"
PROBE_NETNS = "tracepoint:syscalls:unshare/setns/clone/clone3"
PROBE_UID = "tracepoint:sched:sched_process_exec+syscalls:set*uid"
_AF_PACKET, _EPERM = 17, 1
_CHECKED_MEMORY = 65536
# A kernel proof that names no socket (the kernel's `pending` map was full,
# or it holds nothing: all_tcp_states) proves only that some socket on that
# address and port reached the proxy; a second socket bound to the same
# port could be going around it. Such a socket waits this long for the
# proxy's table to know it, and is a bypass if it never does.
UNBOUND_PROOF_PATIENCE_S = 2.0
# A socket still connecting when its window ends, its port not yet in any
# event (the kernel sets SYN_SENT before it picks the port), waits for its
# next event (established, or closed after its SYNs went unanswered: ~127 s
# with the default tcp_syn_retries), at most this long.
PORT_PATIENCE_S = 135.0
# The same UDP destination from the same process raises one alert per window.
_UDP_REPEAT_S = 5.0


# (ip, port) of a subject socket -> when the proxy's side of it established, and
# the local address it was accepted on; None if the kernel saw no such socket.
KernelProxied = Callable[[str, int], tuple[int, str, int] | None]
# A subject socket's (address, port) and destination -> its flow as conntrack
# confirmed it, redirected into the proxy or not; None if conntrack has none.
FlowLookup = Callable[[tuple[str, int], tuple[str, int]], Flow | None]


class SessionLookup(Protocol):
    def match(self, client_ip: str, client_port: int, dst_ip: str, dst_port: int) -> bool:
        """True if the proxy accepted (client_ip, client_port) for original
        destination (dst_ip, dst_port), open or recently closed."""
        ...


Tuple4 = tuple[str, int, str, int]


@dataclass(slots=True)
class _Conn:
    opened: TcpEvent            # who connected (captured at SYN_SENT)
    last: TcpEvent              # latest state, with the bound source port
    deadline_ns: int
    states: list[str] = field(default_factory=list)
    established: bool = False
    closed: bool = False
    parked: bool = False        # waits for an event that names its port


def wall_ns(mono_ns: int) -> int:
    """bpf_ktime_get_ns() (CLOCK_MONOTONIC) -> wall clock ns."""
    return time.time_ns() - time.monotonic_ns() + mono_ns


@functools.lru_cache(maxsize=4096)
def alternatives(ip: str) -> tuple[str, ...]:
    """An address and its v4-mapped twin, as the proxy may have seen either."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 6 and addr.ipv4_mapped:
        return ip, str(addr.ipv4_mapped)
    return (ip,)


def matches(sessions: SessionLookup, t: Tuple4) -> bool:
    src, sport, dst, dport = t
    return any(sessions.match(s, sport, d, dport)
               for s in alternatives(src) for d in alternatives(dst))


def tuple_evidence(family: int, t: Tuple4) -> dict:
    src, sport, dst, dport = t
    return {"family": "ipv4" if family == AF_INET else "ipv6", "protocol": "tcp",
            "src": src, "sport": sport, "dst": dst, "dport": dport,
            "original_destination": f"{dst}:{dport}" if family == AF_INET
            else f"[{dst}]:{dport}"}


class CrossCheck:
    def __init__(self, store: Appender, sessions: SessionLookup, procs: ProcessTable, *,
                 window_ms: float, udp_allowed_ports: frozenset[int] = frozenset(),
                 proxy_listen: frozenset[str] = frozenset(),
                 kernel_proxied: KernelProxied | None = None,
                 flows: FlowLookup | None = None, own_netns: int = 0):
        self.store, self.sessions, self.procs = store, sessions, procs
        # What the kernel saw the proxy accept (loader.Probes.proxied), on the
        # proxy's listen addresses: asked when the session table does not match.
        self.proxy_listen, self.kernel_proxied = proxy_listen, kernel_proxied
        # conntrack's view (agent/conntrack.py), asked last: it holds the
        # agent's own namespace's flows only.
        self.conntrack_flow, self.own_netns = flows, own_netns
        # Whether the kernel still holds an established subject socket's events
        # (loader.Probes.pending): the poll thread will judge it.
        self.kernel_pending: Callable[[str, int], bool] | None = None
        self.window_ns = int(window_ms * 1e6)
        self.udp_allowed_ports = udp_allowed_ports
        self._live: dict[int, _Conn] = {}               # socket address -> open socket
        self._due: list[tuple[int, int, _Conn]] = []    # (deadline, seq, socket)
        self._seq = 0
        self._checked: OrderedDict[Tuple4, bool] = OrderedDict()
        self._udp_last: dict[tuple, float] = {}
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()

    # -- events (the poll thread, or the proxy's when it drains the buffer) ----------

    def on_event(self, ev: Event) -> None:
        self._count(type(ev).__name__)
        handler = self._HANDLERS.get(type(ev))
        if handler is not None:
            handler(self, ev)

    def _on_tcp(self, ev: TcpEvent) -> None:
        with self._lock:
            conn = self._live.get(ev.sk)
            if conn is not None and ev.newstate == "SYN_SENT":
                conn.closed = True    # its CLOSE event was lost; this is a new socket
                conn = None
            if conn is None:
                # A socket address is reused as soon as the socket is freed:
                # a closed one is never looked up by address again.
                conn = self._live[ev.sk] = _Conn(ev, ev, 0)
                self._schedule(conn, ev.ts_ns)
            if ev.sport:
                conn.last = ev
            conn.states.append(ev.newstate)
            if ev.newstate == "ESTABLISHED":
                conn.established = True
                self._schedule(conn, ev.ts_ns)
            elif ev.newstate == "CLOSE":
                conn.closed = True
                del self._live[ev.sk]
                if conn.parked:        # its port is known now: judged a window on
                    self._schedule(conn, ev.ts_ns)

    def _proxy_record(self, t: Tuple4) -> tuple[int, str, int] | None:
        """The kernel's record of the proxy accepting (t's address, port) on
        one of its listen addresses, or None."""
        seen = self.kernel_proxied(t[0], t[1]) if self.kernel_proxied is not None else None
        return seen if seen is not None and seen[1] in self.proxy_listen else None

    def _kernel_proof(self, conn: _Conn, t: Tuple4) -> str | None:
        """"socket": the kernel proved this socket went into the proxy;
        "port": some socket on its address and port did; None: no proof."""
        seen = self._proxy_record(t)
        # An entry from before this socket's connect is an earlier socket's
        # that had the same address and port, and one that proved another
        # socket (the kernel knew which) is that socket's: no proof for this one.
        if seen is None or seen[0] < conn.opened.ts_ns:
            return None
        return "socket" if seen[2] == conn.opened.sk else "port" if seen[2] == 0 else None

    def _flow(self, netns: int, t: Tuple4) -> Flow | None:
        """The socket's flow as conntrack has it. Its entries are per
        4-tuple, so a socket sharing its address and port with another is
        told apart, and they hold the client port the proxy accepted when
        conntrack changed it on the way (two subject sockets on one port, to
        two destinations, would otherwise be one flow at the proxy). Only
        for the agent's own network namespace, where its rules and that
        conntrack table are."""
        if self.conntrack_flow is None or netns != self.own_netns:
            return None
        return self.conntrack_flow((t[0], t[1]), (t[2], t[3]))

    def redirected(self, netns: int, t: Tuple4) -> bool:
        """conntrack redirected this socket's flow into the proxy."""
        flow = self._flow(netns, t)
        return flow is not None and flow.redirected

    def _schedule(self, conn: _Conn, ts_ns: int) -> None:
        conn.deadline_ns = ts_ns + self.window_ns
        self._seq += 1
        heapq.heappush(self._due, (conn.deadline_ns, self._seq, conn))

    # -- the window (poll thread, after each poll) ----------------------------------

    def tick(self, now_ns: int | None = None) -> None:
        now = time.monotonic_ns() if now_ns is None else now_ns
        for conn in self._take_due(now):
            self._judge(conn, now)

    def ms_until_due(self, idle_ms: int) -> int:
        """Milliseconds until the earliest pending verdict (at least 1), or idle_ms."""
        with self._lock:
            if not self._due:
                return idle_ms
            left = (self._due[0][0] - time.monotonic_ns()) // 1_000_000 + 1
        return int(max(1, min(idle_ms, left)))

    def _take_due(self, now: int) -> list[_Conn]:
        due = []
        with self._lock:
            while self._due and self._due[0][0] <= now:
                deadline, _, conn = heapq.heappop(self._due)
                if conn.deadline_ns == deadline:      # else rescheduled later
                    if self._live.get(conn.opened.sk) is conn:
                        del self._live[conn.opened.sk]
                    due.append(conn)
        return due

    def _judge(self, conn: _Conn, now: int) -> None:
        ev = conn.last
        t = (ev.saddr, ev.sport, ev.daddr, ev.dport)
        if not ev.sport:
            self._park_or_drop(conn, now)
            return
        in_table = matches(self.sessions, t)
        proof = None if in_table else self._kernel_proof(conn, t)
        flow = None
        if not in_table and proof != "socket":
            flow = self._flow(conn.opened.netns, t)
            if flow is not None and flow.redirected:
                proof = "conntrack"
        if proof == "port" and now - conn.opened.ts_ns < UNBOUND_PROOF_PATIENCE_S * 1e9:
            self._count("tcp_port_proof_waits")
            self._judge_again(conn, now)   # the proxy's table must know it
            return
        matched = in_table or proof in ("socket", "conntrack")
        self._remember(t, matched)
        if matched:
            self._count("tcp_matched" if in_table else "tcp_matched_in_conntrack"
                        if proof == "conntrack" else "tcp_matched_in_kernel")
        elif conn.established or not conn.closed:
            self._count("tcp_bypass")
            self._bypass(conn, t)
        elif flow is not None:
            # Unanswered, and conntrack confirmed its flow without the
            # redirect: its SYNs (and a Fast Open SYN's data) left the host.
            self._count("tcp_refused_bypass")
            self._bypass(conn, t)
        else:
            self._count("tcp_refused_unmatched")

    def _park_or_drop(self, conn: _Conn, now: int) -> None:
        """A socket whose events have not named its port yet: one still
        connecting waits for its next event (which does); one closed before
        it had a port sent nothing."""
        if conn.closed or now - conn.opened.ts_ns >= PORT_PATIENCE_S * 1e9:
            self._count("tcp_unbound")
            return
        self._count("tcp_port_waits")
        conn.parked = True
        self._judge_again(conn, conn.opened.ts_ns + int(PORT_PATIENCE_S * 1e9))

    def _judge_again(self, conn: _Conn, ts_ns: int) -> None:
        """Back among the live sockets (its events still count), judged a
        window after ts_ns, or sooner if an event reschedules it."""
        with self._lock:
            self._live.setdefault(conn.opened.sk, conn)
            self._schedule(conn, ts_ns)

    def _remember(self, t: Tuple4, matched: bool) -> None:
        with self._lock:
            self._checked[t] = matched
            while len(self._checked) > _CHECKED_MEMORY:
                self._checked.popitem(last=False)

    def known(self, t: Tuple4) -> bool:
        """Whether the event path has this socket: pending or already judged
        here, or still held by the kernel (proven, or waiting in `pending`
        for its window; see bpf/tcp_connect.c)."""
        with self._lock:
            if t in self._checked or any(
                    (c.last.saddr, c.last.sport, c.last.daddr, c.last.dport) == t
                    for _, _, c in self._due):
                return True
        if self.kernel_pending is not None and self.kernel_pending(t[0], t[1]):
            return True
        return self._proxy_record(t) is not None

    def _bypass(self, conn: _Conn, t: Tuple4) -> None:
        who = conn.opened
        state = "established" if conn.established else "syn_sent"
        self.alert(AlertType.BYPASS,
                   f"{who.comm} (pid {who.tgid}, uid {who.uid}) connected to "
                   f"{t[2]}:{t[3]} without the proxy ({state})",
                   who, PROBE_TCP, **tuple_evidence(who.family, t),
                   tcp_states=conn.states, socket=hex(who.sk),
                   match_window_ms=self.window_ns / 1e6)

    # -- the other paths -----------------------------------------------------------

    def _on_udp(self, ev: UdpEvent) -> None:
        if ev.dport in self.udp_allowed_ports:
            return
        key = (ev.tgid, ev.daddr, ev.dport)
        now = time.monotonic()
        with self._lock:
            repeat = now - self._udp_last.get(key, -_UDP_REPEAT_S) < _UDP_REPEAT_S
            if not repeat:
                self._udp_last[key] = now
        if repeat:
            self._count("udp_repeat")
            return
        dest = f"{ev.daddr}:{ev.dport}" if ev.family else "connected peer (unknown)"
        self.alert(AlertType.UDP_BLOCKED, f"{ev.comm} (pid {ev.tgid}) sent UDP to {dest}",
                   ev, PROBE_UDP, protocol="udp", dst=ev.daddr, dport=ev.dport,
                   original_destination=dest, send_result=ev.ret, syscall=ev.syscall)

    def _on_socket(self, ev: SocketEvent) -> None:
        kind = "packet" if ev.family == _AF_PACKET else "raw"
        refused = ev.ret == -_EPERM
        self.alert(AlertType.RAW_SOCKET,
                   f"{ev.comm} (pid {ev.tgid}) asked for a {kind} socket"
                   + (" (refused)" if refused else ""),
                   ev, PROBE_SOCKET, socket_family=ev.family, socket_type=ev.type,
                   socket_protocol=ev.protocol, result=ev.ret, refused=ev.ret < 0)

    def _on_netns(self, ev: NetnsEvent) -> None:
        self.alert(AlertType.NETNS,
                   f"{ev.comm} (pid {ev.tgid}) left its network namespace "
                   f"(syscall {ev.syscall}, result {ev.ret})",
                   ev, PROBE_NETNS, flags=hex(ev.flags), syscall=ev.syscall, result=ev.ret,
                   old_netns=ev.old_netns, new_netns=ev.new_netns)

    def _on_uid(self, ev: UidEvent) -> None:
        how = "set-user-ID exec" if ev.syscall == 0 else f"syscall {ev.syscall}"
        self.alert(AlertType.UID_CHANGE,
                   f"{ev.comm} (pid {ev.tgid}) changed uid {ev.old_uid}->{ev.new_uid}, "
                   f"euid {ev.old_euid}->{ev.new_euid} ({how})",
                   ev, PROBE_UID, old_uid=ev.old_uid, new_uid=ev.new_uid,
                   old_euid=ev.old_euid, new_euid=ev.new_euid, syscall=ev.syscall)

    def alert(self, type_: AlertType, summary: str, who: Header, probe: str, **more) -> None:
        self._count(f"alert_{type_.value}")
        record_alert(self.store, type_, summary, time_ns=wall_ns(who.ts_ns),
                     **who.evidence(), process_chain=self.procs.chain(who.tgid),
                     probe=probe, **more)

    _HANDLERS = {
        TcpEvent: _on_tcp, UdpEvent: _on_udp, SocketEvent: _on_socket,
        NetnsEvent: _on_netns, UidEvent: _on_uid,
        ExecEvent: lambda self, ev: self.procs.on_exec(ev),
        ForkEvent: lambda self, ev: self.procs.on_fork(ev),
    }

    def _count(self, what: str) -> None:
        with self._lock:    # events are handled on two threads (Probes.drain)
            self.counts[what] += 1

    def statistics(self) -> dict:
        with self._lock:
            return {"pending_sockets": len(self._due), **self.counts}
