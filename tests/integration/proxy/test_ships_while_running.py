"""Issue 5 inside `tollgate run`: with shipping on, what the agent records
reaches (a real gRPC) Cloud Logging without any other command."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import CORP_V4, Sandbox, wait_for
from agent.demo.servers import HttpServer
from agent.store import iter_records

FAKE = str(Path(__file__).parent / "fake_logging_main.py")


def test_running_agent_ships_its_records(tmp_path):
    sb = Sandbox(prefix="tgs", subject="tgsubject")
    sb.up()
    http = None
    try:
        http = HttpServer(sb).start()
        port_file, out = tmp_path / "port", tmp_path / "entries.txt"
        sb.spawn(sb.bastion, [sys.executable, FAKE, str(port_file), str(out)])
        port = wait_for(lambda: port_file.exists() and port_file.read_text(), 20, what="fake")
        agent = AgentProcess(sb, workdir=str(tmp_path / "a"), extra=(
            f'[witness]\nenabled = false\n[ship]\nenabled = true\nproject_id = "p"\n'
            f'endpoint = "127.0.0.1:{port}"\ninsecure = true\ninstance_id = "1"\n'
            f'zone = "z"\nstate_dir = "{tmp_path}/ship"\npoll_interval_s = 0.2\n'))
        agent.start()
        try:
            r = sb.subject_run(["curl", "-sS", f"http://{CORP_V4}:8080/hello.txt"])
            assert r.returncode == 0
            def all_shipped() -> bool:
                # insertId is tg-<store id>-<seq>[.<part>]: one per record.
                got = ({line.split()[0].split(".")[0].rsplit("-", 1)[1]
                        for line in out.read_text().splitlines()} if out.exists() else set())
                session = [r for r in iter_records(agent.store, strict=False)
                           if r.kind.name in ("SESSION_OPEN", "DATA", "SESSION_CLOSE")]
                return len(session) >= 4 and all(str(r.seq) in got for r in session)
            wait_for(all_shipped, 20, what="records shipped")
            assert "tollgate" in out.read_text()
        finally:
            agent.stop()
            subprocess.run(["chattr", "-R", "-i", str(agent.store)], capture_output=True)
    finally:
        sb.down()
        if http:
            http.stop()
