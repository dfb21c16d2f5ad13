"""Where a redirected connection was going, from conntrack's NAT record."""

from __future__ import annotations

import ipaddress
import socket
import struct

SO_ORIGINAL_DST = 80          # linux/netfilter_ipv4.h
IP6T_SO_ORIGINAL_DST = 80     # linux/netfilter_ipv6/ip6_tables.h
_SOCKADDR_IN = struct.Struct("!2xH4s8x")
_SOCKADDR_IN6 = struct.Struct("!2xH4x16s4x")


class NotRedirected(Exception):
    """The connection reached the proxy without passing through the redirect."""


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """(ip, port) the client connected to before nftables redirected it.

    An IPv4 client on a dual-stack listener shows up as ::ffff:a.b.c.d; its
    NAT record is an IPv4 one, so it is asked for with the IPv4 option.
    """
    if sock.family == socket.AF_INET6 and not _is_v4_mapped(sock.getpeername()[0]):
        return _ask(sock, socket.IPPROTO_IPV6, IP6T_SO_ORIGINAL_DST, _SOCKADDR_IN6,
                    socket.AF_INET6)
    return _ask(sock, socket.IPPROTO_IP, SO_ORIGINAL_DST, _SOCKADDR_IN, socket.AF_INET)


def _ask(sock: socket.socket, level: int, opt: int, layout: struct.Struct,
         family: int) -> tuple[str, int]:
    try:
        raw = sock.getsockopt(level, opt, layout.size)
    except OSError as e:
        raise NotRedirected(str(e)) from e
    port, addr = layout.unpack_from(raw)
    return socket.inet_ntop(family, addr), port


def _is_v4_mapped(ip: str) -> bool:
    return ipaddress.ip_address(ip.split("%")[0]).ipv4_mapped is not None


def plain_ip(ip: str) -> str:
    """::ffff:1.2.3.4 -> 1.2.3.4, so one client has one spelling everywhere."""
    if ":" not in ip:
        return ip  # IPv4 as the kernel spells it: already plain (and per connection, hot)
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)
