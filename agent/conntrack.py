"""What conntrack knows of a subject connection the redirect changed.

The redirect is a DNAT to the proxy's port on loopback. Two subject sockets
may share a local address and port (SO_REUSEADDR, each to another
destination); both would then reach the proxy as one 4-tuple, so conntrack
gives the second another source port: the proxy accepts a port the subject's
socket never had, and the witness, which sees the socket, finds no session
for it. conntrack holds both sides of every flow; these ask it from either
side (one netlink request; used only when the cheap ways found nothing).
Its entries are the kernel's and out of the subject's reach (CAP_NET_ADMIN).
"""

from __future__ import annotations

import ipaddress
import socket
import threading
from dataclasses import dataclass

from pyroute2 import NetlinkError
from pyroute2.netlink.nfnetlink.nfctsocket import IPS_DST_NAT, NFCTAttrTuple, NFCTSocket

LOOPBACK = {socket.AF_INET: "127.0.0.1", socket.AF_INET6: "::1"}
_local = threading.local()


def _plain(ip: str) -> tuple[int, str]:
    """Family and address as conntrack keeps them (a v4-mapped one as IPv4)."""
    addr = ipaddress.ip_address(ip)
    if addr.version == 4:
        return socket.AF_INET, ip
    if addr.ipv4_mapped is not None:
        return socket.AF_INET, str(addr.ipv4_mapped)
    return socket.AF_INET6, ip


def _ct(family: int) -> NFCTSocket:
    """One netlink socket per thread and family, kept."""
    socks = getattr(_local, "socks", None)
    if socks is None:
        socks = _local.socks = {}
    if family not in socks:
        socks[family] = NFCTSocket(nfgen_family=family)
    return socks[family]


def _entry(family: int, side: str, src: tuple[str, int], dst: tuple[str, int]):
    t = NFCTAttrTuple(family=family, saddr=src[0], sport=src[1], daddr=dst[0], dport=dst[1],
                      proto=socket.IPPROTO_TCP)
    try:
        found = _ct(family).entry("get", **{side: t})
    except (NetlinkError, OSError):   # ENOENT: no such flow (or no conntrack here)
        return None
    return found[0] if found else None


def _end(msg, tuple_name: str, end: str) -> tuple[str, int]:
    """(address, port) of one end ("SRC" or "DST") of the entry's tuple."""
    tup = msg.get_attr(tuple_name)
    ip = tup.get_attr("CTA_TUPLE_IP")
    addr = ip.get_attr(f"CTA_IP_V4_{end}") or ip.get_attr(f"CTA_IP_V6_{end}")
    return addr, tup.get_attr("CTA_TUPLE_PROTO").get_attr(f"CTA_PROTO_{end}_PORT")


@dataclass(frozen=True, slots=True)
class Flow:
    """A subject socket's flow as conntrack confirmed it: it is in the table
    only once its first packet passed the output path (a SYN dropped by a
    local rule leaves no entry)."""
    proxied_as: tuple[str, int] | None   # the client the proxy accepts; None: not redirected

    @property
    def redirected(self) -> bool:
        """conntrack redirected it into the proxy."""
        return self.proxied_as is not None


def flow_of(src: tuple[str, int], dst: tuple[str, int], proxy_port: int) -> Flow | None:
    """The flow of the subject socket src -> dst, and whether conntrack
    redirected it to the proxy's port on loopback; None if conntrack knows
    no such flow (or does not run here)."""
    family, ip = _plain(src[0])
    msg = _entry(family, "tuple_orig", (ip, src[1]), (_plain(dst[0])[1], dst[1]))
    if msg is None:
        return None
    if (not msg.get_attr("CTA_STATUS") & IPS_DST_NAT
            or _end(msg, "CTA_TUPLE_REPLY", "SRC") != (LOOPBACK[family], proxy_port)):
        return Flow(None)
    return Flow(_end(msg, "CTA_TUPLE_REPLY", "DST"))


def as_sent(client: tuple[str, int], proxy_port: int) -> tuple[str, int] | None:
    """The subject socket's own (address, port) behind a client the proxy
    accepted on loopback, if conntrack changed it on the way; else None."""
    family, ip = _plain(client[0])
    msg = _entry(family, "tuple_reply", (LOOPBACK[family], proxy_port), (ip, client[1]))
    if msg is None:
        return None
    own = _end(msg, "CTA_TUPLE_ORIG", "SRC")
    return own if own != (ip, client[1]) else None
