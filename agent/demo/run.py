"""The newcomer's tour: everything built, shown and torn down in one go."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path
from typing import Callable

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import CORP_V4, CORP_V6, Sandbox
from agent.demo.servers import HttpServer, Postgres
from agent.store.immutable import set_immutable


def run_demo(keep: bool = False, echo: Callable[[str], None] = print) -> None:
    if os.geteuid() != 0:
        raise RuntimeError("the demo builds network namespaces and nftables rules: run it as root")
    interrupt_this_process_only()  # Ctrl-C and SIGTERM end in the finally below
    sb = Sandbox()
    pg = http = agent = None
    try:
        echo("== building sandbox: namespaces tgdemo-bastion and tgdemo-corp, "
             f"subject user {sb.subject}")
        sb.up()
        pg, http = Postgres(sb).start(), HttpServer(sb).start()
        echo(f"== servers in corp: PostgreSQL {CORP_V4}:5432, HTTP [{CORP_V6}]:8080")
        agent = AgentProcess(sb)
        verification_key = _seal(agent)
        agent.start()
        echo(f"== agent running in bastion (store {agent.store}, sealed)")
        _subject_traffic(sb, echo)
        echo("== recorded sessions (tollgate sessions)")
        echo(agent.cli("sessions", text=True).stdout)
        sid = _first_session(agent)
        echo(f"== replay of session {sid} (tollgate replay {sid})")
        echo(agent.cli("replay", str(sid), text=True).stdout)
        if keep:
            echo(f"== sandbox kept; try: ip netns exec {sb.bastion} setpriv --reuid={sb.subject} "
                 f"--init-groups --regid={sb.subject} curl http://{CORP_V4}:8080/hello.txt ; "
                 f"Ctrl-C to remove it")
            signal.pause()
        agent.stop()
        echo("== the store, proven whole and sealed (tollgate verify --key FILE)")
        echo(agent.cli("verify", "--key", str(verification_key), text=True).stdout)
    except KeyboardInterrupt:
        echo("== interrupted")
    finally:
        sb.down()
        for server in (pg, http):
            if server:
                server.stop()
        if agent is not None:
            agent.stop()
            _remove(agent.work)
        echo("== sandbox removed")


def interrupt_this_process_only() -> None:
    """Make SIGINT and SIGTERM raise KeyboardInterrupt in this process, and
    end at once any process forked from it.

    pyroute2 forks a helper for each netlink socket it opens in a namespace
    and stops it with SIGTERM. A helper that inherited a raising handler went
    on as a second copy of the demo: it printed "interrupted" and ran the
    cleanup below, removing the namespaces under the first copy, whose next
    lookup then found its veth missing (seen under CPU load, where the
    signal lands before the helper's own exit).
    """
    owner = os.getpid()

    def interrupt(signum: int, _frame: object) -> None:
        if os.getpid() != owner:
            os._exit(128 + signum)  # as the default action would, without cleanup
        raise KeyboardInterrupt

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)


def _subject_traffic(sb: Sandbox, echo: Callable[[str], None]) -> None:
    steps = [
        ["psql", "-h", CORP_V4, "-U", "postgres", "-d", "corp", "-c",
         "select * from customers order by id"],
        ["curl", "-sS", f"http://{CORP_V4}:8080/hello.txt"],
        ["curl", "-sS", "-g", f"http://[{CORP_V6}]:8080/hello.txt"],
    ]
    for argv in steps:
        echo(f"$ {' '.join(argv)}    # as {sb.subject}, unaware of tollgate")
        r = sb.subject_run(argv, text=True)
        echo((r.stdout + r.stderr).rstrip())


def _remove(work: Path) -> None:
    """The agent's config, store and keys: a tour's, not evidence to keep.
    Finished segments are immutable, so that flag goes first."""
    for path in work.rglob("*"):
        if path.is_file():
            set_immutable(path, False)
    shutil.rmtree(work, ignore_errors=True)


def _seal(agent: AgentProcess) -> Path:
    """A sealing key, as the deb's install makes one; the verification key
    (which compliance would keep off the host) beside it, for the verify."""
    out = agent.cli("keys", "init", text=True, check=True).stdout
    path = agent.work / "verification.key"
    path.write_text(out.strip().splitlines()[-1] + "\n")
    return path


def _first_session(agent: AgentProcess) -> int:
    import orjson
    sessions = orjson.loads(agent.cli("sessions", "--json").stdout)
    if not sessions:
        raise RuntimeError("no session was recorded")
    return sessions[0]["id"]
