"""proctext: what a real process shows in /proc, bounded and valid UTF-8."""

from __future__ import annotations

import os
import subprocess
import sys
import orjson
import pytest

from agent.demo.sandbox import wait_for
from agent.proctext import MAX_ARGV_BYTES, Argv, fs_text, read_argv, split

SLEEP = "import time; time.sleep(30)"


@pytest.fixture
def spawn():
    procs = []

    def start(argv: list) -> subprocess.Popen:
        p = subprocess.Popen(argv)
        procs.append(p)
        # Popen may return (vfork) before the new program's argv is in place
        wait_for(lambda: read_argv(p.pid) and read_argv(p.pid).args[:1] == (os.fsdecode(argv[0]),),
                 10, what="the child's exec")
        return p
    yield start
    for p in procs:
        p.kill()
        p.wait()


def area(argv: list) -> int:
    return sum(len(os.fsencode(a)) + 1 for a in argv)


def test_short_argv_is_whole(spawn):
    argv = [sys.executable, "-c", SLEEP, "a b", ""]
    p = spawn(argv)
    got = read_argv(p.pid)
    assert got == Argv((sys.executable, "-c", SLEEP, "a b"), 0)  # a trailing empty arg: its NUL only
    assert got.evidence() == {"argv": [sys.executable, "-c", SLEEP, "a b"]}


def test_long_argv_keeps_the_start_and_counts_the_rest(spawn):
    argv = [sys.executable, "-c", SLEEP, *["y" * 100_000] * 3]
    p = spawn(argv)
    got = read_argv(p.pid)
    assert got.args[:3] == (sys.executable, "-c", SLEEP)
    assert "".join(got.args[3:]) == "y" * (MAX_ARGV_BYTES - area(argv[:3]))
    assert got.cut == area(argv) - MAX_ARGV_BYTES
    assert got.evidence()["argv_cut_bytes"] == got.cut


def test_bytes_that_are_not_utf8_are_named_and_serialize(spawn):
    p = spawn([sys.executable.encode(), b"-c", SLEEP.encode(), b"caf\xe9", b"\xff\xfe"])
    got = read_argv(p.pid)
    assert got.args[3:] == ("caf\\xe9", "\\xff\\xfe")
    assert orjson.loads(orjson.dumps(got.evidence()))["argv"][3] == "caf\\xe9"
    assert fs_text(os.fsdecode(b"/home/s/\xff")) == "/home/s/\\xff"
    assert fs_text(None) is None


def test_exec_event_prefix_counts_what_it_did_not_carry():
    assert split(b"ls\0-l\0", 300) == Argv(("ls", "-l"), 294)
    assert split(b"", 0) == Argv((), 0)
    assert split(b"", 40) == Argv((), 40)


def test_a_process_that_is_gone_is_none():
    p = subprocess.Popen(["true"])
    p.wait()
    assert read_argv(p.pid) is None
