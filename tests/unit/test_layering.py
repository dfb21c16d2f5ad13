"""The layering DESIGN.md promises, enforced: each package imports only the
parts below it on the data path. The store knows nobody; the proxy does not
know the witness, the shipper or review; nothing but the daemon, the CLI and
the demo wires parts together."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

AGENT = Path(__file__).resolve().parents[2] / "agent"

# package -> the agent packages/modules it may import (besides itself)
ALLOWED = {
    "native": set(),
    "store": {"native"},
    "enforce": set(),
    "proxy": {"store", "alerts", "native", "readcache", "proctext", "sdnotify"},
    "witness": {"store", "alerts", "config", "readcache", "proctext", "conntrack"},
    "ship": {"store", "alerts", "config"},
    "review": {"store"},
    "alerts": {"store"},
    "config": set(),
    "logs": set(),
    "readcache": set(),
    "proctext": set(),
    "conntrack": set(),
    "sdnotify": set(),
}


def agent_imports(path: Path) -> set[str]:
    """First component after `agent.` of every import in the file."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        for name in names:
            parts = name.split(".")
            if parts[0] == "agent" and len(parts) > 1:
                found.add(parts[1])
    return found


def files_of(part: str) -> list[Path]:
    pkg = AGENT / part
    return sorted(pkg.rglob("*.py")) if pkg.is_dir() else [AGENT / f"{part}.py"]


@pytest.mark.parametrize("part", sorted(ALLOWED))
def test_imports_stay_below(part):
    bad = {f.relative_to(AGENT).as_posix(): sorted(agent_imports(f) - ALLOWED[part] - {part})
           for f in files_of(part)}
    assert {k: v for k, v in bad.items() if v} == {}


def test_every_part_is_listed():
    """A new top-level part must take a place in the layering above."""
    parts = {p.stem for p in AGENT.glob("*.py") if p.stem != "__init__"}
    parts |= {p.name for p in AGENT.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    wiring = {"cli", "daemon", "demo", "control", "doctor"}
    assert parts - wiring - set(ALLOWED) == set()
