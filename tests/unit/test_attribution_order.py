"""The daemon names a session's process from the kernel's connect event,
else from sock_diag and /proc, and when both come up empty (the client has
closed and the witness was slow), from the kernel's event once more: a
session is never recorded without anyone behind it while the kernel's
evidence is on its way. Real sock_diag and /proc; the event is the witness's."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import agent.daemon as daemon
from agent import conntrack
from agent.proxy import attribution
from agent.witness.connections import ConnectTable
from agent.witness.events import TcpEvent
from agent.witness.procs import ProcessTable


def established(client: tuple[str, int], dst: tuple[str, int]) -> TcpEvent:
    return TcpEvent(ts_ns=1, pid=os.getpid(), tgid=os.getpid(), uid=os.getuid(), cgroup_id=7,
                    netns=9, comm="psql", sk=1, family=2, saddr=client[0], sport=client[1],
                    daddr=dst[0], dport=dst[1], oldstate="SYN_SENT", newstate="ESTABLISHED")


def ask(client: tuple[str, int], dst: tuple[str, int], event_after_s: float | None) -> tuple:
    table = ConnectTable(ProcessTable(lambda uid: True))

    def from_proc(c):
        return asyncio.to_thread(attribution.attribute, c, dst, [os.getuid()])

    def before_nat(c):   # the real conntrack, where nothing redirected these
        return asyncio.to_thread(conntrack.as_sent, c, 15001)

    async def run():
        if event_after_s is not None:
            threading.Timer(event_after_s, table.on_event, (established(client, dst),)).start()
        return await daemon.kernel_then_proc(table, client, dst, from_proc, before_nat)

    return asyncio.run(run()), table


def test_a_late_kernel_event_names_a_client_that_proc_found_gone():
    # The port is nobody's: sock_diag finds no socket, as for a client that has closed.
    gone = ("127.0.0.1", 1), ("127.0.0.1", 2)
    info, table = ask(*gone, event_after_s=daemon.KERNEL_ATTRIBUTION_WAIT_S + 0.3)
    assert info["pid"] == os.getpid() and info["uid"] == os.getuid()
    assert info["proc_error"] == "client socket already gone"
    assert (table.hits, table.misses) == (1, 1)


def test_without_any_evidence_the_proc_error_is_recorded(monkeypatch):
    monkeypatch.setattr(daemon, "KERNEL_LATE_WAIT_S", 0.1)
    info, table = ask(("127.0.0.1", 1), ("127.0.0.1", 2), event_after_s=None)
    assert info == {"error": "client socket already gone"}
    assert (table.hits, table.misses) == (0, 2)


def test_a_live_client_is_named_by_proc_without_asking_the_kernel_again():
    with socket.create_server(("127.0.0.1", 0)) as server, \
            socket.create_connection(server.getsockname()) as client:
        info, table = ask(client.getsockname(), server.getsockname(), event_after_s=None)
    assert info["uid"] == os.getuid() and info["probe"] == "sock_diag"
    assert info["pid"] == os.getpid()
    assert (table.hits, table.misses) == (0, 1)
