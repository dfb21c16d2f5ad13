"""Apply, verify and remove the ruleset. Apply is one transaction: the old
table is deleted and the new one added in the same batch, so the kernel never
holds a moment without rules.
"""

from __future__ import annotations

import copy

from agent.enforce.nft import Nft, NftError
from agent.enforce.ruleset import FAMILY, Ruleset


def apply(nft: Nft, ruleset: Ruleset) -> None:
    """Replace tollgate's table atomically, then prove it landed as written."""
    table = {"family": FAMILY, "name": ruleset.table}
    cmds = [{"add": {"table": table}}, {"delete": {"table": table}}]
    cmds += [{"add": obj} for obj in ruleset.objects()]
    nft.run(cmds)
    problems = verify(nft, ruleset)
    if problems:
        raise NftError("ruleset read back differs: " + "; ".join(problems))


def verify(nft: Nft, ruleset: Ruleset) -> list[str]:
    """Differences between the kernel's table and the ruleset; [] if equal."""
    live = nft.list_table(FAMILY, ruleset.table)
    if live is None:
        return [f"table {FAMILY} {ruleset.table} is missing"]
    want = [_normal(o) for o in ruleset.objects()]
    have = [_normal(o) for o in live]
    problems = [f"missing {_describe(o)}" for o in want if o not in have]
    problems += [f"unexpected {_describe(o)}" for o in have if o not in want]
    if not problems and want != have:
        problems.append("rules are in a different order")
    return problems


def remove(nft: Nft, table: str) -> bool:
    """Delete tollgate's table; False if it was not there."""
    if nft.list_table(FAMILY, table) is None:
        return False
    nft.run([{"delete": {"table": {"family": FAMILY, "name": table}}}])
    return True


def counters(nft: Nft, table: str) -> dict[str, int]:
    """Packets counted by the subject_egress chain's reject rule (blocked traffic)."""
    live = nft.list_table(FAMILY, table) or []
    total = 0
    for obj in live:
        for e in obj.get("rule", {}).get("expr", []):
            if "counter" in e:
                total += e["counter"].get("packets", 0)
    return {"rejected_packets": total}


def _normal(obj: dict) -> dict:
    """Drop what the kernel adds (handles, counter values) before comparing."""
    obj = copy.deepcopy(obj)
    body = next(iter(obj.values()))
    body.pop("handle", None)
    if "elem" in body:
        body["elem"] = sorted(body["elem"])
    for e in body.get("expr", []):
        if "counter" in e:
            e["counter"] = {}
    return obj


def _describe(obj: dict) -> str:
    kind, body = next(iter(obj.items()))
    return f"{kind} {body.get('name') or body.get('chain', '')}".strip()
