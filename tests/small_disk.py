"""A disk that fills: a small tmpfs, and a store filled on it down to the
last byte. Shared by the store's, the witness's and the proxy's disk-full
tests (importable as `small_disk`: pyproject puts tests/ on the path)."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.store import Direction, StoreError, StoreWriter


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of `size` (mount's syntax: "1m") mounted on path for the block."""
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


def resize(path: Path, size: str) -> None:
    """Give the tmpfs on path room (or take it): space returns."""
    subprocess.run(["mount", "-o", f"remount,size={size}", str(path)], check=True)


def fill(w: StoreWriter) -> None:
    """Append until the store fails, down to the last byte: big records,
    then ever smaller ones."""
    for size in (3000, 100, 1):
        with pytest.raises(StoreError):
            for i in range(100_000):
                w.append_data(1, Direction.SERVER, bytes([i % 256]) * size)
