"""An exec event carries the first 128 bytes of a program's path and 256 of
its argv. The process table says so in evidence when /proc cannot give the
rest (the process has gone), and takes the rest from /proc while it runs."""

from __future__ import annotations

import ctypes as ct
import os
import subprocess
import sys

from agent.demo.sandbox import wait_for
from agent.proctext import read_argv
from agent.witness import events
from agent.witness.procs import ProcessTable

UID = 1000
GONE = 0x7FFFFFF0   # above any pid_max (at most 2**22): no such process


def exec_record(pid: int, path: bytes, argv: list[bytes]) -> bytes:
    """A ring-buffer record as bpf/process.c fills it for this exec."""
    r = events._Exec()
    r.h.type, r.h.pid, r.h.tgid, r.h.uid = events.EventType.EXEC, pid, pid, UID
    r.filename = path[:127]
    r.filename_size = len(path) + 1
    area = b"".join(a + b"\0" for a in argv)
    ct.memmove(ct.addressof(r) + events._Exec.args.offset, area, min(len(area), 256))
    r.args_len, r.args_size = min(len(area), 256), len(area)
    return bytes(r)


def table_with(record: bytes) -> ProcessTable:
    t = ProcessTable(lambda uid: uid == UID)
    t.on_exec(events.decode(record, len(record)))
    return t


def test_a_gone_process_shows_what_the_event_could_not_carry():
    path = b"/opt/" + b"p" * 200 + b"/tool"
    argv = [b"tool", b"--flag", b"v" * 500]
    [proc] = table_with(exec_record(GONE, path, argv)).chain(GONE)
    assert proc["exe"] == path[:127].decode() and proc["exe_cut_bytes"] == len(path) - 127
    assert proc["argv"] == ["tool", "--flag", "v" * (256 - 12)]
    assert proc["argv_cut_bytes"] == len(b"".join(a + b"\0" for a in argv)) - 256


def test_a_running_process_is_completed_from_proc():
    argv = [sys.executable, "-c", "import time; time.sleep(30)", "w" * 400]
    p = subprocess.Popen(argv)
    try:
        # Popen may return (vfork) before the new program's argv is in place
        wait_for(lambda: read_argv(p.pid) and read_argv(p.pid).args == tuple(argv), 10,
                 what="the child's exec")
        exe = os.path.realpath(f"/proc/{p.pid}/exe")
        [proc] = table_with(exec_record(p.pid, exe.encode(), [a.encode() for a in argv])) \
            .chain(p.pid)
        assert proc["exe"] == exe and "exe_cut_bytes" not in proc
        assert proc["argv"] == argv and "argv_cut_bytes" not in proc
    finally:
        p.kill()
        p.wait()


def test_a_chain_is_built_once_until_the_table_changes():
    t = table_with(exec_record(GONE, b"/usr/bin/psql", [b"psql", b"-h", b"db"]))
    first = t.chain(GONE)
    assert t.chain(GONE) is first            # a client's next connection: no rebuild
    again = exec_record(GONE, b"/usr/bin/ssh", [b"ssh", b"bastion"])
    t.on_exec(events.decode(again, len(again)))
    [proc] = t.chain(GONE)                    # the same pid exec'd anew: built again
    assert proc["exe"] == "/usr/bin/ssh" and proc["argv"] == ["ssh", "bastion"]


def test_listeners_hear_every_new_generation_in_order():
    # The native opener forgets its names on each: a chain built before a
    # change must not name a connection after it.
    t = table_with(exec_record(GONE, b"/usr/bin/psql", [b"psql"]))
    heard: list[int] = []
    t.on_new_generation(heard.append)
    start = t.generation
    for path in (b"/usr/bin/ssh", b"/usr/bin/curl"):
        rec = exec_record(GONE, path, [path.rsplit(b"/", 1)[1]])
        t.on_exec(events.decode(rec, len(rec)))
    assert heard == [start + 1, start + 2] and t.generation == start + 2
