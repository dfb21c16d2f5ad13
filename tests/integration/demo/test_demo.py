"""`tollgate demo` shows a recorded session and leaves nothing behind, even
when interrupted with Ctrl-C while its sandbox is up."""

from __future__ import annotations

import os
import pwd
import select
import signal
import subprocess
import sys
import time

import pytest
from pyroute2 import netns

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")

DEMO = [sys.executable, "-m", "agent.cli", "demo"]


def demo_leftovers() -> list[str]:
    left = [ns for ns in netns.listnetns() if ns.startswith("tgdemo-")]
    try:
        pwd.getpwnam("tg-demo")
        left.append("user tg-demo")
    except KeyError:
        pass
    return left


def test_demo_records_and_replays():
    r = subprocess.run(DEMO, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "select * from customers" in r.stdout and "Grace" in r.stdout
    assert "hello from corp" in r.stdout
    assert "== sandbox removed" in r.stdout
    assert demo_leftovers() == []


def test_ctrl_c_removes_the_sandbox():
    p = subprocess.Popen([*DEMO, "--keep"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    try:
        deadline, seen = time.monotonic() + 240, ""
        while "sandbox kept" not in seen:
            assert time.monotonic() < deadline, seen[-2000:]
            ready, _, _ = select.select([p.stdout], [], [], 5)
            if ready:
                line = p.stdout.readline()
                assert line, p.stderr.read()[-2000:]
                seen += line
        assert any(ns.startswith("tgdemo-") for ns in netns.listnetns())
        os.killpg(p.pid, signal.SIGINT)
        out, _ = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert "== sandbox removed" in out
    assert demo_leftovers() == []
