"""ConnectTable: the proxy's question and the kernel's ESTABLISHED event meet
whichever comes first; no event within the wait is a miss (None), and the
question does not linger."""

from __future__ import annotations

import asyncio
import os
import threading

from agent.witness.connections import ConnectTable
from agent.witness.events import TcpEvent
from agent.witness.procs import ProcessTable

CLIENT, DST = ("10.0.0.5", 40000), ("10.77.0.2", 5432)


def established(pid: int) -> TcpEvent:
    return TcpEvent(ts_ns=1, pid=pid, tgid=pid, uid=1000, cgroup_id=7, netns=9, comm="psql",
                    sk=1, family=2, saddr=CLIENT[0], sport=CLIENT[1], daddr=DST[0],
                    dport=DST[1], oldstate="SYN_SENT", newstate="ESTABLISHED")


def table() -> ConnectTable:
    return ConnectTable(ProcessTable(lambda uid: uid == 1000))


def test_event_before_the_question_is_a_hit():
    t = table()
    t.on_event(established(os.getpid()))
    info = asyncio.run(t.attribution(CLIENT, DST, 0.5))
    assert info["pid"] == os.getpid() and info["uid"] == 1000 and (t.hits, t.misses) == (1, 0)


def test_event_after_the_question_resolves_it_from_another_thread():
    t = table()

    async def ask():
        asked = asyncio.create_task(t.attribution(CLIENT, DST, 5))
        await asyncio.sleep(0.05)
        threading.Thread(target=t.on_event, args=(established(os.getpid()),)).start()
        return await asked

    info = asyncio.run(ask())
    assert info["comm"] == "psql" and t.hits == 1


def test_no_event_is_a_miss_after_the_wait_and_forgets_the_question():
    t = table()
    assert asyncio.run(t.attribution(CLIENT, DST, 0.05)) is None
    assert (t.hits, t.misses) == (0, 1)
    t.on_event(established(os.getpid()))  # late: kept for a later question, not a stale waiter
    assert asyncio.run(t.attribution(CLIENT, DST, 0.05))["pid"] == os.getpid()


def test_asking_without_waiting_takes_an_arrived_event_once():
    t = table()
    assert t.attribution_now(CLIENT, DST) is None       # nothing yet, and nothing left waiting
    t.on_event(established(os.getpid()))
    info = t.attribution_now(CLIENT, DST)
    assert info["pid"] == os.getpid() and t.hits == 1
    assert t.attribution_now(CLIENT, DST) is None       # taken: a later socket is asked anew


class KernelMap:
    """Probes.attributed's contract: the event of a proven socket, taken once."""

    def __init__(self):
        self.held: dict[tuple[str, int], TcpEvent] = {}

    def __call__(self, ip: str, port: int) -> TcpEvent | None:
        return self.held.pop((ip, port), None)


def test_a_socket_the_kernel_proved_is_named_from_its_map_without_an_event():
    kernel = KernelMap()
    t = ConnectTable(ProcessTable(lambda uid: uid == 1000), kernel=kernel)
    kernel.held[CLIENT] = established(os.getpid())
    assert t.attribution_now(CLIENT, DST)["pid"] == os.getpid()
    assert t.attribution_now(CLIENT, DST) is None and t.hits == 1


def test_the_kernel_maps_entry_must_name_the_same_destination():
    kernel = KernelMap()
    t = ConnectTable(ProcessTable(lambda uid: uid == 1000), kernel=kernel)
    kernel.held[CLIENT] = established(os.getpid())
    assert t.attribution_now(CLIENT, ("10.77.0.3", 5432)) is None


def test_a_waiting_question_finds_the_proof_that_lands_in_the_map_later():
    """The proxy can accept a moment before the kernel's proof: no event will
    come for a proven socket, so the wait looks at the map too."""
    kernel = KernelMap()
    t = ConnectTable(ProcessTable(lambda uid: uid == 1000), kernel=kernel)

    async def ask():
        asked = asyncio.create_task(t.attribution(CLIENT, DST, 5))
        await asyncio.sleep(0.01)
        kernel.held[CLIENT] = established(os.getpid())
        return await asyncio.wait_for(asked, 1)

    assert asyncio.run(ask())["pid"] == os.getpid() and (t.hits, t.misses) == (1, 0)
