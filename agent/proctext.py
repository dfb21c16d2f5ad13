"""A process's own words as evidence: argv, exe and name, bounded and valid UTF-8.

A subject chooses these: up to 6 MiB of argv a process (and a chain of
processes above the one that connects), any bytes in a file name or an
argument. Evidence goes into the store as one JSON record, at most 16 MiB
and valid UTF-8; a record that cannot be written fails the store closed
(sessions refused, STORE_FAILED). So argv keeps its first MAX_ARGV_BYTES
and says how many bytes it left out, and bytes that are not UTF-8 read as
\\xNN escapes: shown, never dropped, never able to fail the record.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

MAX_ARGV_BYTES = 64 * 1024


def text(raw: bytes) -> str:
    """Bytes a process chose, as valid UTF-8 text (undecodable bytes as \\xNN)."""
    return raw.decode("utf-8", "backslashreplace")


def fs_text(s: str | None) -> str | None:
    """A str from os or psutil (undecodable bytes held as surrogates) as text()."""
    return None if s is None else text(os.fsencode(s))


@dataclass(frozen=True, slots=True)
class Argv:
    args: tuple[str, ...]
    cut: int = 0   # bytes of the process's argv area not in args

    def evidence(self) -> dict:
        return {"argv": list(self.args), **({"argv_cut_bytes": self.cut} if self.cut else {})}


def split(raw: bytes, size: int) -> Argv:
    """Argv from the first bytes of a NUL-separated argv area of `size` bytes."""
    raw = raw[:MAX_ARGV_BYTES]
    args = tuple(text(a) for a in raw.rstrip(b"\0").split(b"\0")) if raw else ()
    return Argv(args, max(0, size - len(raw)))


def read_argv(pid: int) -> Argv | None:
    """The argv /proc shows for pid, bounded; None if the process is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            raw = f.read(MAX_ARGV_BYTES + 1)
    except OSError:
        return None
    if len(raw) <= MAX_ARGV_BYTES:
        return split(raw, len(raw))
    return split(raw, max(_argv_area_size(pid), len(raw)))


def _argv_area_size(pid: int) -> int:
    """arg_end - arg_start from /proc/<pid>/stat (fields 48 and 49); 0 if unreadable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return int(fields[46]) - int(fields[45])   # field n is fields[n - 3]
    except (OSError, IndexError, ValueError):
        return 0
