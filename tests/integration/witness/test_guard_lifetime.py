"""The guard lives exactly as long as its agent.

Counted with bpftool, which reads the kernel's view independently of the
code under test. A guard left behind by each SIGKILLed agent used to pile up
until the kernel refused the 65th and no witness could start again.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from agent.witness.loader import Probes, cgroup2_root

from . import helpers

GUARD = "tg_guard_sock_c"  # the kernel keeps 15 bytes of a program's name

HOLD_PROBES = r"""
import sys, time
from agent.witness.loader import Probes
p = Probes([int(sys.argv[1])], pages=8, guard=True, on_event=lambda e: None)
p.start()
print("attached", flush=True)
time.sleep(600)
"""

LEAVE_LEGACY_GUARD = r"""
import os, bcc
from agent.witness.loader import cgroup2_root, cflags, program_text
b = bcc.BPF(text=program_text().encode(), cflags=cflags(8))
fn = b.load_func(b"tg_guard_sock_create", bcc.BPF.CGROUP_SOCK)
fd = os.open(cgroup2_root(), os.O_RDONLY | os.O_DIRECTORY)
bcc.BPF.attach_func(fn, fd, bcc.BPFAttachType.CGROUP_INET_SOCK_CREATE, 2)  # ALLOW_MULTI
os._exit(0)   # as a SIGKILLed agent of the old kind would: no detach
"""


def guards() -> list[dict]:
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup2_root()],
                         capture_output=True, text=True, check=True).stdout
    return [p for p in json.loads(out.strip() or "[]") if p.get("name", "").startswith(GUARD)]


def wait_count(n: int, timeout: float = 5.0) -> list[dict]:
    deadline = time.monotonic() + timeout
    while (found := guards()) and len(found) != n and time.monotonic() < deadline:
        time.sleep(0.05)
    return guards()


def run_agent_side(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.fixture
def subject_uid():
    return helpers.ensure_subject().pw_uid


def test_sigkilled_agent_leaves_no_guard_attached(subject_uid):
    before = len(guards())
    p = run_agent_side(HOLD_PROBES, str(subject_uid))
    try:
        assert p.stdout.readline().strip() == "attached"
        assert len(guards()) == before + 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert len(wait_count(before)) == before


def test_guards_left_by_old_agents_are_swept_on_start(subject_uid):
    for _ in range(3):
        subprocess.run([sys.executable, "-c", LEAVE_LEGACY_GUARD], check=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert len(guards()) >= 3
    probes = Probes([subject_uid], pages=8, guard=True, on_event=lambda e: None)
    probes.start()
    try:
        assert len(guards()) == 1   # ours, attached through a link: the sweep spares it
    finally:
        probes.close()
    assert wait_count(0) == []


def test_sweep_spares_the_guard_of_another_running_agent(subject_uid):
    other = run_agent_side(HOLD_PROBES, str(subject_uid))
    try:
        assert other.stdout.readline().strip() == "attached"
        probes = Probes([subject_uid], pages=8, guard=True, on_event=lambda e: None)
        probes.start()
        try:
            assert len(guards()) == 2
        finally:
            probes.close()
        assert len(wait_count(1)) == 1
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()
