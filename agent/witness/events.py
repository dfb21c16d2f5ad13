"""The witness's kernel events: bpf/events.h mirrored once, in ctypes, and
decoded once into frozen dataclasses.

decode() is the only way raw ring-buffer bytes become Python objects. The
ctypes sizes are asserted against the sizes written in events.h so a field
added on one side only fails at import, not as garbage at run time.
"""

from __future__ import annotations

import ctypes as ct
import enum
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from agent.proctext import Argv, split, text

__all__ = ["EventType", "Header", "TcpEvent", "UdpEvent", "SocketEvent", "NetnsEvent",
           "ExecEvent", "UidEvent", "ForkEvent", "ExitEvent", "Event", "decode",
           "TCP_STATES", "AF_INET", "AF_INET6", "Peer", "ProxySide", "Pending", "peer_key",
           "mapped_text", "TCP_EVENT_SIZE"]

AF_INET, AF_INET6 = 2, 10
TCP_STATES = {1: "ESTABLISHED", 2: "SYN_SENT", 3: "SYN_RECV", 4: "FIN_WAIT1",
              5: "FIN_WAIT2", 6: "TIME_WAIT", 7: "CLOSE", 8: "CLOSE_WAIT",
              9: "LAST_ACK", 10: "LISTEN", 11: "CLOSING", 12: "NEW_SYN_RECV"}


class EventType(enum.IntEnum):
    TCP_STATE = 1
    UDP_SEND = 2
    SOCKET = 3
    NETNS = 4
    EXEC = 5
    UID = 6
    FORK = 7
    EXIT = 8
    WAKE = 9   # a header only, decoded to nothing: its arrival ends the poll's sleep


# -- ctypes mirror of bpf/events.h ------------------------------------------------

class _Header(ct.Structure):
    _fields_ = [("ts_ns", ct.c_uint64), ("cgroup_id", ct.c_uint64), ("type", ct.c_uint32),
                ("pid", ct.c_uint32), ("tgid", ct.c_uint32), ("uid", ct.c_uint32),
                ("netns", ct.c_uint32), ("_pad", ct.c_uint32), ("comm", ct.c_char * 16)]


class _Tcp(ct.Structure):
    _fields_ = [("h", _Header), ("sk", ct.c_uint64), ("family", ct.c_uint16),
                ("sport", ct.c_uint16), ("dport", ct.c_uint16), ("oldstate", ct.c_uint8),
                ("newstate", ct.c_uint8), ("saddr", ct.c_uint8 * 16), ("daddr", ct.c_uint8 * 16)]


class _Udp(ct.Structure):
    _fields_ = [("h", _Header), ("family", ct.c_uint16), ("dport", ct.c_uint16),
                ("ret", ct.c_int32), ("daddr", ct.c_uint8 * 16), ("syscall", ct.c_uint32),
                ("_pad", ct.c_uint32)]


class _Socket(ct.Structure):
    _fields_ = [("h", _Header), ("family", ct.c_int32), ("type", ct.c_int32),
                ("protocol", ct.c_int32), ("ret", ct.c_int32)]


class _Netns(ct.Structure):
    _fields_ = [("h", _Header), ("flags", ct.c_uint64), ("syscall", ct.c_uint32),
                ("ret", ct.c_int32), ("old_netns", ct.c_uint32), ("new_netns", ct.c_uint32),
                ("_pad", ct.c_uint64)]


class _Exec(ct.Structure):
    _fields_ = [("h", _Header), ("ppid", ct.c_uint32), ("euid", ct.c_uint32),
                ("args_len", ct.c_uint32), ("args_size", ct.c_uint32),
                ("filename_size", ct.c_uint32), ("_pad", ct.c_uint32),
                ("filename", ct.c_char * 128), ("args", ct.c_char * 256)]


class _Uid(ct.Structure):
    _fields_ = [("h", _Header), ("old_uid", ct.c_uint32), ("new_uid", ct.c_uint32),
                ("old_euid", ct.c_uint32), ("new_euid", ct.c_uint32),
                ("syscall", ct.c_uint32), ("_pad", ct.c_uint32)]


class _Fork(ct.Structure):
    _fields_ = [("h", _Header), ("child_pid", ct.c_uint32), ("_pad", ct.c_uint32)]


class Peer(ct.Structure):
    """Key of the map `proxied`: a subject socket as the proxy's peer."""
    _fields_ = [("addr", ct.c_uint8 * 16), ("port", ct.c_uint16), ("_pad", ct.c_uint8 * 6)]


class ProxySide(ct.Structure):
    """Value of the map `proxied`: the proxy's accepted socket, and the
    subject socket it proved (0: not known)."""
    _fields_ = [("ts_ns", ct.c_uint64), ("local", ct.c_uint8 * 16), ("family", ct.c_uint16),
                ("_pad", ct.c_uint8 * 6), ("sk", ct.c_uint64)]


TCP_EVENT_SIZE = ct.sizeof(_Tcp)


class Pending(ct.Structure):
    """Value of the map `pending`: a subject socket's held SYN_SENT and ESTABLISHED."""
    _fields_ = [("syn", _Tcp), ("est", _Tcp)]


# Sizes as written in bpf/events.h.
for _cls, _size in ((_Header, 56), (_Tcp, 104), (_Udp, 88), (_Socket, 72), (_Netns, 88),
                    (_Exec, 464), (_Uid, 80), (_Fork, 64), (Peer, 24), (ProxySide, 40),
                    (Pending, 208)):
    assert ct.sizeof(_cls) == _size, f"{_cls.__name__} is {ct.sizeof(_cls)} bytes, not {_size}"


# -- typed events -------------------------------------------------------------------

@dataclass(frozen=True, slots=True, kw_only=True)
class Header:
    """Who did it. ts_ns is CLOCK_MONOTONIC (bpf_ktime_get_ns)."""
    ts_ns: int
    pid: int
    tgid: int
    uid: int
    cgroup_id: int
    netns: int
    comm: str

    def evidence(self) -> dict:
        return {"pid": self.pid, "tgid": self.tgid, "uid": self.uid, "comm": self.comm,
                "cgroup_id": self.cgroup_id, "netns_inode": self.netns}


@dataclass(frozen=True, slots=True, kw_only=True)
class TcpEvent(Header):
    sk: int
    family: int
    saddr: str
    sport: int
    daddr: str
    dport: int
    oldstate: str
    newstate: str


@dataclass(frozen=True, slots=True, kw_only=True)
class UdpEvent(Header):
    family: int      # 0: destination unknown
    daddr: str
    dport: int
    ret: int
    syscall: int


@dataclass(frozen=True, slots=True, kw_only=True)
class SocketEvent(Header):
    family: int
    type: int
    protocol: int
    ret: int


@dataclass(frozen=True, slots=True, kw_only=True)
class NetnsEvent(Header):
    flags: int
    syscall: int
    ret: int
    old_netns: int
    new_netns: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExecEvent(Header):
    ppid: int
    euid: int
    filename: str
    filename_cut: int   # bytes of the path the event could not carry
    argv: Argv


@dataclass(frozen=True, slots=True, kw_only=True)
class UidEvent(Header):
    old_uid: int
    new_uid: int
    old_euid: int
    new_euid: int
    syscall: int     # 0: exec of a set-user-ID program


@dataclass(frozen=True, slots=True, kw_only=True)
class ForkEvent(Header):
    child_pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class ExitEvent(Header):
    pass


Event = (TcpEvent | UdpEvent | SocketEvent | NetnsEvent | ExecEvent | UidEvent
         | ForkEvent | ExitEvent)


# -- decoding -----------------------------------------------------------------------

def _addr(family: int, raw) -> str:
    # inet_ntop: several times cheaper than ipaddress on the hot path, same text.
    if family == AF_INET:
        return socket.inet_ntop(socket.AF_INET, bytes(raw[:4]))
    if family == AF_INET6:
        return socket.inet_ntop(socket.AF_INET6, bytes(raw))
    return ""


_V4_MAPPED = b"\0" * 10 + b"\xff\xff"
_PEER_TAIL = struct.Struct("<H6x")


def peer_key(ip: str, port: int) -> bytes:
    """The map key (a Peer's bytes) for a socket address: IPv4 as
    ::ffff:a.b.c.d, as the kernel stores it. Bytes, not a Peer: it is built
    per connection, and a Peer costs three times as much."""
    addr = (socket.inet_pton(socket.AF_INET6, ip) if ":" in ip
            else _V4_MAPPED + socket.inet_pton(socket.AF_INET, ip))
    return addr + _PEER_TAIL.pack(port)


def mapped_text(family: int, raw) -> str:
    """A 16-byte address as the kernel stored it (IPv4 mapped) -> text, as _addr gives it."""
    return _addr(family, bytes(raw)[12:] if family == AF_INET else raw)


def _head(h: _Header) -> dict:
    return {"ts_ns": h.ts_ns, "pid": h.pid, "tgid": h.tgid, "uid": h.uid,
            "cgroup_id": h.cgroup_id, "netns": h.netns,
            "comm": text(h.comm)}


# TCP state changes are three per subject connection: they are unpacked with
# struct (a third of the ctypes path's cost), in the order _flat reads from _Tcp.
_CODES = {ct.c_uint64: "Q", ct.c_uint32: "I", ct.c_int32: "i", ct.c_uint16: "H", ct.c_uint8: "B"}


def _flat(cls: type[ct.Structure]) -> tuple[str, tuple[str, ...]]:
    """A ctypes mirror as a struct format and its field names, nested structs inline."""
    fmt, names = "", ()
    for name, typ in cls._fields_:
        if issubclass(typ, ct.Structure):
            inner, inner_names = _flat(typ)
            fmt, names = fmt + inner, names + inner_names
        else:
            fmt += f"{ct.sizeof(typ)}s" if issubclass(typ, ct.Array) else _CODES[typ]
            names += (name,)
    return fmt, names


_TCP_FORMAT, _TCP_FIELDS = _flat(_Tcp)
_TCP = struct.Struct("<" + _TCP_FORMAT)
assert _TCP.size == ct.sizeof(_Tcp), "_Tcp has implicit padding"
assert _TCP_FIELDS == ("ts_ns", "cgroup_id", "type", "pid", "tgid", "uid", "netns", "_pad",
                       "comm", "sk", "family", "sport", "dport", "oldstate", "newstate",
                       "saddr", "daddr"), "_tcp unpacks _Tcp's fields in this order"


def _tcp(raw: bytes) -> TcpEvent:
    (ts_ns, cgroup_id, _type, pid, tgid, uid, netns, _pad, comm, sk, family, sport, dport,
     oldstate, newstate, saddr, daddr) = _TCP.unpack_from(raw)
    return TcpEvent(ts_ns=ts_ns, pid=pid, tgid=tgid, uid=uid, cgroup_id=cgroup_id, netns=netns,
                    comm=text(comm.split(b"\0", 1)[0]),
                    sk=sk, family=family, saddr=_addr(family, saddr), sport=sport,
                    daddr=_addr(family, daddr), dport=dport,
                    oldstate=TCP_STATES.get(oldstate, str(oldstate)),
                    newstate=TCP_STATES.get(newstate, str(newstate)))


def _udp(r: _Udp) -> UdpEvent:
    return UdpEvent(**_head(r.h), family=r.family, daddr=_addr(r.family, r.daddr),
                    dport=r.dport, ret=r.ret, syscall=r.syscall)


def _socket(r: _Socket) -> SocketEvent:
    return SocketEvent(**_head(r.h), family=r.family, type=r.type, protocol=r.protocol,
                       ret=r.ret)


def _netns(r: _Netns) -> NetnsEvent:
    return NetnsEvent(**_head(r.h), flags=r.flags, syscall=r.syscall, ret=r.ret,
                      old_netns=r.old_netns, new_netns=r.new_netns)


def _exec(r: _Exec) -> ExecEvent:
    # c_char arrays read as bytes stop at the first NUL; argv is NUL-separated.
    start = _Exec.args.offset
    return ExecEvent(**_head(r.h), ppid=r.ppid, euid=r.euid, filename=text(r.filename),
                     filename_cut=max(0, r.filename_size - 1 - len(r.filename)),
                     argv=split(bytes(r)[start:start + r.args_len], r.args_size))


def _uid(r: _Uid) -> UidEvent:
    return UidEvent(**_head(r.h), old_uid=r.old_uid, new_uid=r.new_uid,
                    old_euid=r.old_euid, new_euid=r.new_euid, syscall=r.syscall)


def _fork(r: _Fork) -> ForkEvent:
    return ForkEvent(**_head(r.h), child_pid=r.child_pid)


def _exit(r: _Header) -> ExitEvent:
    return ExitEvent(**_head(r))


def _via_ctypes(cls: type[ct.Structure], build: Callable) -> Callable[[bytes], Event]:
    return lambda raw: build(cls.from_buffer_copy(raw))


# type -> (smallest valid size, bytes -> event)
_DECODERS: dict[int, tuple[int, Callable[[bytes], Event]]] = {
    EventType.TCP_STATE: (ct.sizeof(_Tcp), _tcp),
    **{t: (ct.sizeof(cls), _via_ctypes(cls, build)) for t, cls, build in (
        (EventType.UDP_SEND, _Udp, _udp), (EventType.SOCKET, _Socket, _socket),
        (EventType.NETNS, _Netns, _netns), (EventType.EXEC, _Exec, _exec),
        (EventType.UID, _Uid, _uid), (EventType.FORK, _Fork, _fork),
        (EventType.EXIT, _Header, _exit))},
}
_TYPE_OFFSET = _Header.type.offset


def decode(data: int | bytes, size: int) -> Event | None:
    """One ring-buffer record (address or bytes, size) -> its event; None if unknown."""
    raw = ct.string_at(data, size) if isinstance(data, int) else bytes(data[:size])
    etype = int.from_bytes(raw[_TYPE_OFFSET:_TYPE_OFFSET + 4], "little")
    entry = _DECODERS.get(etype)
    if entry is None or size < entry[0]:
        return None
    return entry[1](raw)
