"""The agent as a real process in the sandbox's bastion namespace, started
with its own config and waited for through systemd's readiness protocol."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

from agent.demo.sandbox import Sandbox


class AgentProcess:
    def __init__(self, sb: Sandbox, workdir: str | None = None, port: int = 15001,
                 extra: str = "", listen: tuple[str, ...] = ("127.0.0.1", "::1"),
                 proxy: str = "") -> None:
        self.sb = sb
        self.work = Path(workdir or tempfile.mkdtemp(prefix="tg-agent-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.store = self.work / "store"
        self.run_dir = self.work / "run"
        self.config = self.work / "tollgate.toml"
        self.config.write_text(
            f'subjects = ["{sb.subject}"]\nrun_dir = "{self.run_dir}"\nlog_level = "debug"\n'
            f'[proxy]\nport = {port}\nlisten = {json.dumps(list(listen))}\n'
            + proxy +
            f'[store]\npath = "{self.store}"\nkey_path = "{self.work}/keys/seal.key"\n{extra}')
        self.proc: subprocess.Popen | None = None
        self.log = self.work / "agent.log"

    def cli(self, *args: str, **kw) -> subprocess.CompletedProcess:
        """`tollgate --config ... ARGS` in the bastion namespace."""
        kw.setdefault("capture_output", True)
        return self.sb.run(self.sb.bastion, [*_tollgate(), "--config", str(self.config), *args],
                           **kw)

    def start(self, timeout: float = 60) -> "AgentProcess":
        notify = self.work / "notify.sock"
        notify.unlink(missing_ok=True)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(str(notify))
            s.settimeout(timeout)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify)}
            self.proc = self.sb.spawn(self.sb.bastion, [*_tollgate(), "--config",
                                                        str(self.config), "run"],
                                      env=env, stderr=open(self.log, "ab"))
            try:
                while b"READY=1" not in s.recv(4096):
                    pass
            except socket.timeout:
                self.stop()
                raise RuntimeError(f"agent did not become ready:\n{self.log.read_text()[-3000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, sig)
            self.proc.wait(30)
        rc, self.proc = self.proc.returncode, None
        return rc


def _tollgate() -> list[str]:
    return [sys.executable, "-m", "agent.cli"]
