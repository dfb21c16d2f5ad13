"""What tollgate puts in the kernel, as data.

One table, `inet tollgate` (IPv4 and IPv6 alike), owned by tollgate alone so
teardown is one delete. Subjects are a named uid set, so adding a subject
changes an element, not the rules.

  nat output:     subject TCP          -> redirect to the proxy port
                  subject UDP/53       -> redirect to the DNS recorder
  filter output:  subject              -> jump subject_egress
  subject_egress: TCP                  -> accept (already redirected)
                  UDP to the DNS recorder (127.0.0.1/::1) -> accept
                  anything else (UDP, QUIC, ICMP, SCTP) -> counted, rejected

The filter hook sees every packet of every process on the host, so it asks
whether the sender is a subject once, not once a rule: a packet of anyone
else costs one set lookup (root's UDP sends, measured: 191k -> 204k a
second with the rules loaded, 235k without).

Redirect happens on the nat *output* hook, so it covers every destination,
loopback included, and the agent's own (root) upstream connections are never
matched: no loops.
"""

from __future__ import annotations

from dataclasses import dataclass

FAMILY = "inet"
SUBJECT_EGRESS = "subject_egress"


@dataclass(frozen=True, slots=True)
class Ruleset:
    table: str
    subject_uids: tuple[int, ...]
    proxy_port: int
    dns_port: int | None

    def objects(self) -> list[dict]:
        """The table's contents in the exact form `nft -j list` prints them."""
        t = {"family": FAMILY, "table": self.table}
        objs: list[dict] = [{"table": {"family": FAMILY, "name": self.table}}]
        objs.append({"set": {**t, "name": "subjects", "type": "uid",
                             **({"elem": sorted(self.subject_uids)} if self.subject_uids else {})}})
        objs.append({"chain": {**t, "name": "steer", "type": "nat", "hook": "output",
                               "prio": -100, "policy": "accept"}})
        objs.append({"chain": {**t, "name": "confine", "type": "filter", "hook": "output",
                               "prio": 0, "policy": "accept"}})
        objs.append({"chain": {**t, "name": SUBJECT_EGRESS}})
        objs += [{"rule": {**t, "chain": "steer", "expr": e}} for e in self._redirects()]
        objs.append({"rule": {**t, "chain": "confine",
                              "expr": [_subject(), {"jump": {"target": SUBJECT_EGRESS}}]}})
        objs += [{"rule": {**t, "chain": SUBJECT_EGRESS, "expr": e}} for e in self._confine()]
        return objs

    def _redirects(self) -> list[list[dict]]:
        rules = [[_subject(), _l4("tcp"), {"redirect": {"port": self.proxy_port}}]]
        if self.dns_port:
            rules.append([_subject(), _match({"payload": {"protocol": "udp", "field": "dport"}}, 53),
                          {"redirect": {"port": self.dns_port}}])
        return rules

    def _confine(self) -> list[list[dict]]:
        """subject_egress: a subject's packets only."""
        rules = [[_l4("tcp"), {"accept": None}]]
        if self.dns_port:
            # After the redirect the destination is loopback; the output
            # interface the hook reports is still the original route's.
            for proto, lo in (("ip", "127.0.0.1"), ("ip6", "::1")):
                rules.append([_match({"payload": {"protocol": proto, "field": "daddr"}}, lo),
                              _match({"payload": {"protocol": "udp", "field": "dport"}}, self.dns_port),
                              {"accept": None}])
        rules.append([{"counter": {"packets": 0, "bytes": 0}},
                      {"reject": {"type": "icmpx", "expr": "port-unreachable"}}])
        return rules


def _match(left: dict, right) -> dict:
    return {"match": {"op": "==", "left": left, "right": right}}


def _subject() -> dict:
    return _match({"meta": {"key": "skuid"}}, "@subjects")


def _l4(proto: str) -> dict:
    return _match({"meta": {"key": "l4proto"}}, proto)


def render(table: str, subject_uids: tuple[int, ...], proxy_port: int,
           dns_port: int | None) -> Ruleset:
    return Ruleset(table, tuple(sorted(set(subject_uids))), proxy_port, dns_port)
