"""The cross-check's verdict on one subject socket: the proxy's session table
first, then the kernel's record of the proxy accepting it (the map `proxied`).
A kernel record counts only if it is newer than the socket's connect, was
accepted on one of the proxy's listen addresses and proved this socket; one
that could not tell which socket (port only) makes the socket wait for the
proxy's table instead; anything else is a bypass."""

from __future__ import annotations

import pytest

from agent.conntrack import Flow
from agent.store.format import Kind
from agent.witness.crosscheck import CrossCheck
from agent.witness.events import TcpEvent
from agent.witness.procs import ProcessTable

SRC, DST = ("10.0.0.5", 40000), ("10.77.0.2", 5432)
CONNECT_NS, WINDOW_MS = 1_000_000, 50


class Alerts:
    def __init__(self):
        self.alerts: list[dict] = []

    def defer_json(self, kind, obj):
        assert kind == Kind.ALERT
        self.alerts.append(obj)
        return len(self.alerts)


class Table:
    def __init__(self, known: bool):
        self.known = known

    def match(self, client_ip, client_port, dst_ip, dst_port):
        return self.known and (client_ip, client_port, dst_ip, dst_port) == (*SRC, *DST)


def event(state: str, ts_ns: int, sport: int) -> TcpEvent:
    return TcpEvent(ts_ns=ts_ns, pid=7, tgid=7, uid=1000, cgroup_id=1, netns=2, comm="curl",
                    sk=0xABC, family=2, saddr=SRC[0], sport=sport, daddr=DST[0], dport=DST[1],
                    oldstate="CLOSE" if state == "SYN_SENT" else "SYN_SENT", newstate=state)


def judge(known: bool, kernel: tuple[int, str, int] | None) -> tuple[CrossCheck, Alerts, list]:
    asked: list = []

    def proxied(ip: str, port: int):
        asked.append((ip, port))
        return kernel

    alerts = Alerts()
    check = CrossCheck(alerts, Table(known), ProcessTable(lambda uid: uid == 1000),
                       window_ms=WINDOW_MS, proxy_listen=frozenset({"127.0.0.1", "::1"}),
                       kernel_proxied=proxied)
    check.on_event(event("SYN_SENT", CONNECT_NS, 0))
    check.on_event(event("ESTABLISHED", CONNECT_NS + 30_000, SRC[1]))
    check.tick(CONNECT_NS + 10**9)
    return check, alerts, asked


def test_the_session_table_answers_first_and_the_kernel_is_not_asked():
    check, alerts, asked = judge(True, None)
    assert check.counts["tcp_matched"] == 1 and not alerts.alerts and asked == []


def test_a_fresh_kernel_record_on_a_listen_address_proves_the_proxy_took_it():
    check, alerts, asked = judge(False, (CONNECT_NS + 40_000, "127.0.0.1", 0xABC))
    assert check.counts["tcp_matched_in_kernel"] == 1 and not alerts.alerts
    assert asked == [SRC]


PORT_ONLY = (CONNECT_NS + 40_000, "127.0.0.1", 0)   # the kernel could not tell which socket


def test_a_port_only_proof_waits_for_the_proxys_table():
    """A proof of the address and port alone (the kernel's `pending` map was
    full) is not this socket's: a second socket on the same port may have
    dialed the proxy. Matched once the proxy's table knows it."""
    check, alerts, _ = judge(False, PORT_ONLY)
    assert check.counts["tcp_port_proof_waits"] == 1 and check.counts["tcp_matched"] == 0
    check.sessions.known = True                    # the proxy accepted it, late
    check.tick(CONNECT_NS + 10**9 + WINDOW_MS * 10**6)
    assert check.counts["tcp_matched"] == 1 and not alerts.alerts


def test_a_port_only_proof_the_table_never_confirms_is_a_bypass():
    check, alerts, _ = judge(False, PORT_ONLY)
    for ms in (1500, 2500):                        # within, then past the patience
        check.tick(CONNECT_NS + ms * 10**6)
    assert check.counts["tcp_bypass"] == 1 and check.counts["tcp_matched_in_kernel"] == 0
    assert check.counts["tcp_port_proof_waits"] >= 2
    [alert] = alerts.alerts
    assert alert["type"] == "bypass" and alert["evidence"]["sport"] == SRC[1]


@pytest.mark.parametrize("kernel", [
    None,                                         # the kernel saw no proxy side
    (CONNECT_NS - 1, "127.0.0.1", 0),             # an earlier socket's, same address and port
    (CONNECT_NS + 40_000, "10.0.0.9", 0),         # accepted elsewhere on the proxy's port
    (CONNECT_NS + 40_000, "127.0.0.1", 0xDEF),    # it proved another socket on this port
], ids=["none", "stale", "not-a-listen-address", "another-socket"])
def test_anything_else_is_a_bypass(kernel):
    check, alerts, _ = judge(False, kernel)
    assert check.counts["tcp_bypass"] == 1 and check.counts["tcp_matched_in_kernel"] == 0
    [alert] = alerts.alerts
    assert alert["type"] == "bypass" and alert["evidence"]["sport"] == SRC[1]


@pytest.mark.parametrize("pending, kernel, known", [
    (True, None, True),                           # its events wait in the kernel's `pending`
    (False, (CONNECT_NS, "127.0.0.1", 0), True),  # proven: the proxy's address accepted it
    (False, (CONNECT_NS, "10.0.0.9", 0), False),  # the proxy's port, not its address
    (False, None, False),                         # nothing anywhere: the sweep's to report
], ids=["pending", "proven", "not-a-listen-address", "unknown"])
def test_the_sweep_counts_what_the_kernel_still_holds_as_known(pending, kernel, known):
    """A socket the kernel holds (bpf/tcp_connect.c sends no event for it
    until its window passes, or ever once proven) is the event path's."""
    check = CrossCheck(Alerts(), Table(False), ProcessTable(lambda uid: uid == 1000),
                       window_ms=WINDOW_MS, proxy_listen=frozenset({"127.0.0.1", "::1"}),
                       kernel_proxied=lambda ip, port: kernel)
    check.kernel_pending = lambda ip, port: pending and (ip, port) == SRC
    assert check.known((*SRC, *DST)) is known


def conntrack_check(flow: Flow | None, own_netns: int = 2) -> tuple[CrossCheck, Alerts, list]:
    """Neither the table nor the kernel's record knows the socket; conntrack
    is asked (agent/conntrack.py, tested for real in
    tests/integration/proxy/test_nat_remap.py and the witness's tests)."""
    asked: list = []

    def flows(src, dst):
        asked.append((src, dst))
        return flow

    alerts = Alerts()
    check = CrossCheck(alerts, Table(False), ProcessTable(lambda uid: uid == 1000),
                       window_ms=WINDOW_MS, proxy_listen=frozenset({"127.0.0.1"}),
                       kernel_proxied=lambda ip, port: None, flows=flows,
                       own_netns=own_netns)
    return check, alerts, asked


def judged_with_conntrack(proxied_as, own_netns: int) -> tuple[CrossCheck, Alerts, list]:
    check, alerts, asked = conntrack_check(Flow(proxied_as), own_netns)
    check.on_event(event("SYN_SENT", CONNECT_NS, 0))
    check.on_event(event("ESTABLISHED", CONNECT_NS + 30_000, SRC[1]))
    check.tick(CONNECT_NS + 10**9)
    return check, alerts, asked


def test_a_flow_conntrack_redirected_into_the_proxy_is_no_bypass():
    check, alerts, asked = judged_with_conntrack(("10.0.0.5", 61000), own_netns=2)
    assert check.counts["tcp_matched_in_conntrack"] == 1 and not alerts.alerts
    assert asked == [(SRC, DST)]


def test_conntrack_is_not_asked_for_a_socket_of_another_namespace():
    """Its flows are in that namespace's conntrack, not the agent's: a flow
    of the same 4-tuple here proves nothing about it."""
    check, alerts, asked = judged_with_conntrack(("10.0.0.5", 61000), own_netns=3)
    assert check.counts["tcp_bypass"] == 1 and asked == []


def test_a_flow_conntrack_did_not_redirect_is_a_bypass():
    check, alerts, asked = judged_with_conntrack(None, own_netns=2)
    assert check.counts["tcp_bypass"] == 1 and len(alerts.alerts) == 1


def closed_unestablished(flow: Flow | None) -> tuple[CrossCheck, Alerts]:
    """Connecting past its window with no port in its events yet (autobind:
    the kernel sets SYN_SENT before it picks the port), then closed without
    establishing: refused, or its SYNs unanswered."""
    check, alerts, _ = conntrack_check(flow)
    check.on_event(event("SYN_SENT", CONNECT_NS, 0))
    check.tick(CONNECT_NS + 10**9)                         # parked, not dropped
    assert check.counts["tcp_port_waits"] == 1 and not alerts.alerts
    check.on_event(event("CLOSE", CONNECT_NS + 3 * 10**9, SRC[1]))
    check.tick(CONNECT_NS + 4 * 10**9)
    return check, alerts


def test_a_closed_socket_whose_syn_left_around_the_proxy_is_a_bypass():
    """conntrack still holds its flow, without the redirect: its SYNs (and a
    Fast Open SYN's data) left the host unanswered."""
    check, alerts = closed_unestablished(Flow(None))
    assert check.counts["tcp_refused_bypass"] == 1 and len(alerts.alerts) == 1
    assert alerts.alerts[0]["evidence"]["sport"] == SRC[1]


def test_a_closed_socket_conntrack_never_confirmed_is_only_counted():
    """No entry: its SYN was dropped before it left, it was refused (conntrack
    forgets an unassured flow at its RST), or conntrack is off."""
    check, alerts = closed_unestablished(None)
    assert check.counts["tcp_refused_unmatched"] == 1 and not alerts.alerts


def test_a_closed_socket_redirected_into_the_proxy_is_no_bypass():
    """Redirected, but the proxy's backlog was full (or it was down)."""
    check, alerts = closed_unestablished(Flow(("10.0.0.5", 61000)))
    assert check.counts["tcp_matched_in_conntrack"] == 1 and not alerts.alerts


def test_a_socket_closed_before_it_had_a_port_sent_nothing():
    check, alerts, asked = conntrack_check(Flow(None))
    check.on_event(event("SYN_SENT", CONNECT_NS, 0))
    check.on_event(event("CLOSE", CONNECT_NS + 10_000, 0))
    check.tick(CONNECT_NS + 10**9)
    assert check.counts["tcp_unbound"] == 1 and not alerts.alerts and asked == []
