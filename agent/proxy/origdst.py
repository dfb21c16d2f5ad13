"""Where a redirected connection was going, from conntrack's NAT record."""

from __future__ import annotations

import ipaddress
import socket

from agent import native


class NotRedirected(Exception):
    """The connection reached the proxy without passing through the redirect."""


def original_dst(sock: socket.socket) -> tuple[str, int]:
    """(ip, port) the client connected to before nftables redirected it, from
    conntrack's NAT record (agent/native/accept.c, which the native plane's
    accept uses too); IPv4 clients of a dual-stack listener come out plain."""
    try:
        return native.original_dst(sock.fileno())
    except OSError as e:
        raise NotRedirected(str(e)) from e


def plain_ip(ip: str) -> str:
    """::ffff:1.2.3.4 -> 1.2.3.4, so one client has one spelling everywhere."""
    if ":" not in ip:
        return ip  # IPv4 as the kernel spells it: already plain (and per connection, hot)
    addr = ipaddress.ip_address(ip.split("%")[0])
    mapped = getattr(addr, "ipv4_mapped", None)
    return str(mapped or addr)
