"""The demo's SIGTERM/SIGINT handling: a process forked from the demo (as
pyroute2 forks one per namespaced netlink socket, and stops it with SIGTERM)
must end, not go on as a second copy running the demo's cleanup."""

from __future__ import annotations

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import os, signal, time
    from agent.demo.run import interrupt_this_process_only
    interrupt_this_process_only()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(w, b"+")
            time.sleep(30)
        except KeyboardInterrupt:
            os.write(w, b" went on as a copy")
        os._exit(0)
    os.read(r, 1)
    os.kill(pid, signal.SIGTERM)
    _, status = os.waitpid(pid, 0)
    os.close(w)
    print("child", os.waitstatus_to_exitcode(status), os.read(r, 100))
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10)
    except KeyboardInterrupt:
        print("parent interrupted")
""")


def test_a_forked_helper_ends_on_sigterm_and_the_demo_is_interrupted():
    r = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stderr
    # 143: ended as SIGTERM's default action would; nothing more written.
    assert r.stdout.splitlines() == ["child 143 b''", "parent interrupted"]
