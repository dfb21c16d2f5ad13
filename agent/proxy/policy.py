"""Destinations a subject may never reach (deny wins), or the only ones it may
reach (allow, when given). The cloud metadata server is denied by default:
through it the subject could take the VM's service-account token.
"""

from __future__ import annotations

import functools
import ipaddress
from dataclasses import dataclass


# eq=False: hashed by identity, since _refuse_ip's cache hashes the policy on
# every connection and a hash of every network cost more than the lookup.
@dataclass(frozen=True, slots=True, eq=False)
class Policy:
    deny: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]
    own: frozenset[tuple[str, int]] = frozenset()  # the proxy's listeners: no loops

    @classmethod
    def build(cls, deny: tuple[str, ...], allow: tuple[str, ...],
              own: set[tuple[str, int]] = frozenset()) -> "Policy":
        nets = lambda xs: tuple(ipaddress.ip_network(x, strict=False) for x in xs)
        return cls(nets(deny), nets(allow), frozenset(own))

    def refuse(self, ip: str, port: int) -> str | None:
        """Why (ip, port) is refused, or None if the subject may go there."""
        if (ip, port) in self.own:
            return "destination is the proxy itself"
        return _refuse_ip(self, ip)


# Asked once per connection, and a subject dials few distinct addresses.
@functools.lru_cache(maxsize=4096)
def _refuse_ip(policy: Policy, ip: str) -> str | None:
    addr = ipaddress.ip_address(ip)
    for net in policy.deny:
        if addr.version == net.version and addr in net:
            return f"{ip} is in deny list ({net})"
    if policy.allow and not any(addr.version == n.version and addr in n for n in policy.allow):
        return f"{ip} is not in the allow list"
    return None
