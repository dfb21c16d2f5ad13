"""How much of a file the page cache holds (util-linux fincore): for the
store tests that check which pages it keeps or reads ahead (importable as
`page_cache`: pyproject puts tests/ on the path)."""

from __future__ import annotations

import subprocess
from pathlib import Path


def cached_bytes(path: Path) -> int:
    out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True).stdout
    return int(out.strip())
