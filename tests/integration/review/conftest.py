"""One sandbox (prefix tgr, subject tgreview) with real servers in corp and
the real agent in bastion, for the module; tests run real clients as the
subject and review what the agent recorded through the `tollgate` CLI."""

from __future__ import annotations

import os
import subprocess

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import Sandbox, wait_for
from agent.demo.servers import Postgres
from agent.review.sessions import list_sessions

from review_servers import MariaDb, Nginx, Redis, Sshd, with_statement_log


@pytest.fixture(scope="session")
def sandbox():
    if os.geteuid() != 0:
        pytest.skip("needs root: network namespaces, nftables (CI runs as root)")
    with Sandbox(prefix="tgr", subject="tgreview") as sb:
        yield sb


@pytest.fixture(scope="session")
def servers(sandbox):
    pg = Postgres(sandbox).start()
    pg.statement_log = with_statement_log(pg)
    started = {"pg": pg, "mariadb": MariaDb(sandbox).start(), "redis": Redis(sandbox).start(),
               "nginx": Nginx(sandbox).start(), "sshd": Sshd(sandbox).start()}
    yield started
    for server in started.values():
        server.stop()


@pytest.fixture(scope="session")
def agent(sandbox, servers, tmp_path_factory):
    a = AgentProcess(sandbox, workdir=str(tmp_path_factory.mktemp("agent")))
    a.start()
    yield a
    a.stop()
    # Finished segments are immutable (WORM); a test store must still go away.
    subprocess.run(["chattr", "-R", "-i", str(a.store)], capture_output=True)


class Subject:
    """Runs clients as the subject and finds the sessions they made."""

    def __init__(self, sandbox: Sandbox, agent: AgentProcess) -> None:
        self.sb, self.agent = sandbox, agent

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        kw.setdefault("text", True)
        r = self.sb.subject_run(argv, **kw)
        assert r.returncode == 0, (argv, r.stdout, r.stderr)
        return r

    def sessions_to(self, port: int) -> list:
        return [s for s in list_sessions(str(self.agent.store)) if s.original_dst[1] == port]

    def new_sessions(self, port: int, before: int, count: int = 1) -> list:
        """The closed sessions to ``port`` recorded after the first ``before`` ones."""
        def closed():
            found = self.sessions_to(port)[before:]
            return found if len(found) >= count and all(s.close for s in found) else None
        return wait_for(closed, 15, what=f"{count} closed session(s) to port {port}")

    def session_of(self, port: int, argv: list[str], **kw) -> tuple:
        """Run ``argv`` as the subject; (its one new session to ``port``, the run)."""
        before = len(self.sessions_to(port))
        r = self.run(argv, **kw)
        found = self.new_sessions(port, before)
        assert len(found) == 1, found
        return found[0], r


@pytest.fixture(scope="session")
def subject(sandbox, agent) -> Subject:
    return Subject(sandbox, agent)
