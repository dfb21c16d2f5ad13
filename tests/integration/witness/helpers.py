"""Shared pieces of the witness integration tests: the test subject user,
the tgw-* network namespaces, a root TCP server inside one, and running
code as the subject there."""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from agent.store import Kind, iter_records

SUBJECT = "tgwsubj"
NETNS = "tgw-a"
SUBJECT_PYTHON = "/usr/bin/python3"     # stdlib only, readable by the subject

SERVER = r"""
import selectors, socket, sys
sel = selectors.DefaultSelector()
for addr in sys.argv[2:] or ("127.0.0.1", "::1"):
    s = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind((addr, int(sys.argv[1]))); s.listen(4096); s.setblocking(False)
    sel.register(s, selectors.EVENT_READ, "listen")
print("ready", flush=True)
while True:
    for key, _ in sel.select():
        if key.data == "listen":
            c, _ = key.fileobj.accept(); c.setblocking(False)
            sel.register(c, selectors.EVENT_READ, "conn")
        else:
            try:
                data = key.fileobj.recv(4096)
            except OSError:
                data = b""
            if not data:
                sel.unregister(key.fileobj); key.fileobj.close()
"""


def copy_python(directory: Path, *, caps: str = "", setuid_root: bool = False) -> str:
    """A copy of python3 the subject can run, with file capabilities or set-user-ID root."""
    os.chmod(directory, 0o755)
    exe = directory / "python3"
    shutil.copy2(SUBJECT_PYTHON, exe)
    if caps:
        subprocess.run(["setcap", caps, str(exe)], check=True)
    if setuid_root:
        os.chown(exe, 0, 0)
        os.chmod(exe, 0o4755)
    return str(exe)


def ensure_subject() -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(SUBJECT)
    except KeyError:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell",
                        "/usr/sbin/nologin", SUBJECT], check=True)
        return pwd.getpwnam(SUBJECT)


def make_netns(name: str = NETNS) -> int:
    """Create (or reuse) our namespace with lo up; returns its inode."""
    if not Path(f"/run/netns/{name}").exists():
        subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    return os.stat(f"/run/netns/{name}").st_ino


def delete_netns(name: str = NETNS) -> None:
    subprocess.run(["ip", "netns", "del", name], check=False)


def start_server(port: int, netns: str = NETNS, addrs: tuple[str, ...] = (),
                 code: str = SERVER) -> subprocess.Popen:
    """A root TCP server on port in netns, on addrs (default 127.0.0.1 and
    ::1): SERVER, or code that prints "ready" as it does."""
    p = subprocess.Popen(["ip", "netns", "exec", netns, sys.executable, "-c", code,
                          str(port), *addrs], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "ready"
    return p


def subject_cmd(argv: list[str], netns: str = NETNS) -> list[str]:
    return ["ip", "netns", "exec", netns, "setpriv", f"--reuid={SUBJECT}",
            f"--regid={SUBJECT}", "--init-groups", *argv]


@contextlib.contextmanager
def held_subject(code: str, *args: str, stdin: bool = False) -> Iterator[subprocess.Popen]:
    """Run code as the subject in the background (stdout a pipe, stdin too
    if asked); killed on leaving."""
    p = subprocess.Popen(subject_cmd([SUBJECT_PYTHON, "-c", code, *args]), text=True,
                         stdin=subprocess.PIPE if stdin else None, stdout=subprocess.PIPE)
    try:
        yield p
    finally:
        p.kill()
        p.wait()


def run_subject(code: str, *args: str, python: str = SUBJECT_PYTHON, netns: str = NETNS,
                timeout: float = 30) -> dict:
    """Run code as the subject in netns; it prints one JSON object, returned."""
    out = subprocess.run(subject_cmd([python, "-c", code, *args], netns), check=True,
                         capture_output=True, text=True, timeout=timeout)
    return json.loads(out.stdout.strip().splitlines()[-1])


def alerts(store_dir: Path) -> list[dict]:
    return [r.json() for r in iter_records(store_dir, strict=False) if r.kind == Kind.ALERT]


def wait_alert(store_dir: Path, timeout: float = 10.0, **want) -> dict:
    """The first alert whose type and evidence hold every want item, within
    timeout: generous, since it returns as soon as the alert is there and a
    loaded machine may schedule the witness's thread late."""
    deadline = time.monotonic() + timeout
    while True:
        for a in alerts(store_dir):
            if _has(a, want):
                return a
        if time.monotonic() > deadline:
            raise AssertionError(f"no alert {want} within {timeout}s; have "
                                 f"{[(a['type'], a['summary']) for a in alerts(store_dir)]}")
        time.sleep(0.02)


def _has(alert: dict, want: dict) -> bool:
    for k, v in want.items():
        have = alert.get(k, alert["evidence"].get(k))
        if have != v:
            return False
    return True


def none_match(store_dir: Path, **want) -> bool:
    return not any(_has(a, want) for a in alerts(store_dir))
