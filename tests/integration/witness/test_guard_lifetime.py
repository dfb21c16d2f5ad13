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


def guards() -> set[int]:
    """Ids of the guard programs attached to the cgroup2 root. Other agents
    (fixtures of other test modules) may hold theirs: tests compare sets."""
    out = subprocess.run(["bpftool", "-j", "cgroup", "show", cgroup2_root()],
                         capture_output=True, text=True, check=True).stdout
    return {p["id"] for p in json.loads(out.strip() or "[]")
            if p.get("name", "").startswith(GUARD)}


def wait_guards(want: set[int], timeout: float = 5.0) -> set[int]:
    """The attached set once it equals want (links are released asynchronously)."""
    deadline = time.monotonic() + timeout
    while (found := guards()) != want and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def run_agent_side(code: str, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE,
                            text=True, cwd=os.getcwd(),
                            env={**os.environ, "PYTHONPATH": os.getcwd()})


@pytest.fixture
def subject_uid():
    return helpers.ensure_subject().pw_uid


def test_sigkilled_agent_leaves_no_guard_attached(subject_uid):
    before = guards()
    p = run_agent_side(HOLD_PROBES, str(subject_uid))
    try:
        assert p.stdout.readline().strip() == "attached"
        assert len(guards() - before) == 1
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    assert wait_guards(before) == before


def test_guards_left_by_old_agents_are_swept_on_start(subject_uid):
    before = guards()
    for _ in range(3):
        subprocess.run([sys.executable, "-c", LEAVE_LEGACY_GUARD], check=True,
                       env={**os.environ, "PYTHONPATH": os.getcwd()})
    left = guards() - before
    assert len(left) == 3
    probes = Probes([subject_uid], pages=8, guard=True, on_event=lambda e: None)
    probes.start()
    try:
        now = guards()
        ours = now - before
        assert not now & left                 # the leftovers are gone
        assert len(ours) == 1                 # ours, attached through a link
    finally:
        probes.close()
    assert wait_guards(now - ours) == now - ours


def test_sweep_spares_the_guard_of_another_running_agent(subject_uid):
    before = guards()
    other = run_agent_side(HOLD_PROBES, str(subject_uid))
    try:
        assert other.stdout.readline().strip() == "attached"
        theirs = guards() - before
        probes = Probes([subject_uid], pages=8, guard=True, on_event=lambda e: None)
        probes.start()
        try:
            now = guards()
            assert theirs <= now and len(now - before - theirs) == 1
        finally:
            probes.close()
        assert wait_guards(before | theirs) == before | theirs
    finally:
        other.send_signal(signal.SIGKILL)
        other.wait()


def test_a_start_that_fails_after_the_guard_attached_detaches_it(monkeypatch, subject_uid):
    """The sweep of legacy guards fails (injected: the kernel gives no way to
    make it fail on demand) after the link was made: the start reports the
    witness unavailable and leaves no guard of its own behind."""
    from agent.witness import cgroup_link
    from agent.witness.loader import WitnessUnavailable

    def failing_sweep(*args):
        raise OSError(5, "injected sweep failure")

    monkeypatch.setattr(cgroup_link, "sweep_legacy", failing_sweep)
    before = guards()
    p = Probes([subject_uid], pages=8, guard=True, on_event=lambda e: None)
    with pytest.raises(WitnessUnavailable, match="injected sweep failure"):
        p.start()
    try:
        assert wait_guards(before) == before
    finally:
        p.close()
