"""decode() against records built through the ctypes mirror of bpf/events.h."""

from __future__ import annotations

import ctypes as ct
import socket

from agent.witness import events as E


def tcp_record(family: int, saddr: bytes, daddr: bytes, **fields) -> bytes:
    r = E._Tcp()
    r.h.type, r.h.ts_ns, r.h.pid, r.h.tgid, r.h.uid = E.EventType.TCP_STATE, 123, 7, 6, 1001
    r.h.cgroup_id, r.h.netns, r.h.comm = 99, 4026531840, b"psql"
    r.family, r.sk, r.sport, r.dport = family, 0xFFFF8880DEADBEEF, 40000, 5432
    r.oldstate, r.newstate = 2, 1
    ct.memmove(r.saddr, saddr, len(saddr))
    ct.memmove(r.daddr, daddr, len(daddr))
    for k, v in fields.items():
        setattr(r, k, v)
    return bytes(r)


def test_tcp_v4_from_the_ring_buffer_address():
    raw = tcp_record(E.AF_INET, bytes([10, 0, 0, 5]), bytes([192, 168, 1, 2]))
    buf = ct.create_string_buffer(raw, len(raw))
    ev = E.decode(ct.addressof(buf), len(raw))
    assert ev == E.TcpEvent(ts_ns=123, pid=7, tgid=6, uid=1001, cgroup_id=99, netns=4026531840,
                            comm="psql", sk=0xFFFF8880DEADBEEF, family=E.AF_INET,
                            saddr="10.0.0.5", sport=40000, daddr="192.168.1.2", dport=5432,
                            oldstate="SYN_SENT", newstate="ESTABLISHED")


def test_tcp_v6_and_an_unknown_state_number():
    src, dst = socket.inet_pton(socket.AF_INET6, "fd00::1"), socket.inet_pton(socket.AF_INET6, "::1")
    ev = E.decode(tcp_record(E.AF_INET6, src, dst, newstate=42), 104)
    assert (ev.saddr, ev.daddr, ev.newstate, ev.comm) == ("fd00::1", "::1", "42", "psql")


def test_a_comm_of_sixteen_bytes_has_no_terminator():
    raw = tcp_record(E.AF_INET, b"\1\1\1\1", b"\2\2\2\2")
    r = E._Tcp.from_buffer_copy(raw)
    r.h.comm = b"0123456789abcdef"
    assert E.decode(bytes(r), 104).comm == "0123456789abcdef"


def test_short_or_unknown_records_are_not_events():
    raw = tcp_record(E.AF_INET, b"\1\1\1\1", b"\2\2\2\2")
    assert E.decode(raw, 103) is None
    r = E._Tcp.from_buffer_copy(raw)
    r.h.type = 77
    assert E.decode(bytes(r), 104) is None


def test_other_types_still_decode_through_ctypes():
    r = E._Fork()
    r.h.type, r.h.pid, r.child_pid, r.h.comm = E.EventType.FORK, 5, 6, b"bash"
    ev = E.decode(bytes(r), ct.sizeof(r))
    assert isinstance(ev, E.ForkEvent) and (ev.pid, ev.child_pid, ev.comm) == (5, 6, "bash")
