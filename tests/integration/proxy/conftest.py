"""One sandbox (bastion + corp namespaces), real servers and a real agent
process for the module; tests run the subject's clients in the bastion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import Sandbox
from agent.demo.servers import HttpServer, Postgres, port_open
from agent.demo.sandbox import CORP_V4, wait_for

PEERS = str(Path(__file__).parent.parent / "peers.py")
EXACT_PORT, HALFCLOSE_PORT, UDP_PORT = 7001, 7002, 7003
# Logs every datagram it receives: proof that blocked UDP never arrived.
UDP_SINK = ("import socket,sys\ns=socket.socket(socket.AF_INET6,socket.SOCK_DGRAM)\n"
            "s.setsockopt(socket.IPPROTO_IPV6,socket.IPV6_V6ONLY,0)\ns.bind(('::',int(sys.argv[1])))\n"
            "while True:\n d,a=s.recvfrom(65535)\n open(sys.argv[2],'a').write(repr(d)+'\\n')")

pytestmark = pytest.mark.root


def server_lines(out: Path) -> list[dict]:
    """What peers.py's server wrote so far: a line per transfer, once its
    connection has ended (which may be after the client's end)."""
    return [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []


def pytest_collection_modifyitems(items):
    if os.geteuid() != 0:
        for item in items:
            item.add_marker(pytest.mark.skip(reason="needs root (CI runs as root)"))


@pytest.fixture(scope="session")
def sandbox():
    sb = Sandbox(prefix="tgt", subject="tgsubject")
    sb.up()
    yield sb
    sb.down()


@pytest.fixture(scope="session")
def servers(sandbox, tmp_path_factory):
    pg, http = Postgres(sandbox).start(), HttpServer(sandbox).start()
    out = tmp_path_factory.mktemp("peers") / "server.jsonl"
    sandbox.spawn(sandbox.corp, [sys.executable, PEERS, "server", str(EXACT_PORT), str(out)])
    sandbox.spawn(sandbox.corp, [sys.executable, PEERS, "halfclose-server",
                                 str(HALFCLOSE_PORT), str(3 << 20)])
    sandbox.spawn(sandbox.corp, ["dnsmasq", "--keep-in-foreground", "--no-resolv", "--no-hosts",
                                 f"--listen-address={CORP_V4}", "--bind-interfaces",
                                 "--address=/corp.example/10.77.0.2", "--user=root",
                                 "--pid-file="])
    sandbox.spawn(sandbox.corp, [sys.executable, "-c", UDP_SINK, str(UDP_PORT),
                                 str(tmp_path_factory.getbasetemp() / "udp_sink.log")])
    for port in (EXACT_PORT, HALFCLOSE_PORT):
        wait_for(lambda: port_open(sandbox, sandbox.corp, CORP_V4, port), 15, what="peer")
    yield {"pg": pg, "http": http, "exact_out": out}
    pg.stop()
    http.stop()


# Every relay test runs on each data plane, the asyncio one on both loops.
PLANES = {
    "native": 'data_plane = "native"\n',
    "python-uvloop": 'data_plane = "python"\nevent_loop = "uvloop"\n',
    "python-asyncio": 'data_plane = "python"\nevent_loop = "asyncio"\n',
}


@pytest.fixture(scope="session", params=list(PLANES))
def agent(request, sandbox, servers, tmp_path_factory):
    a = AgentProcess(sandbox, workdir=str(tmp_path_factory.mktemp("agent")),
                     extra=f'[dns]\nresolver = "{CORP_V4}"\n', proxy=PLANES[request.param])
    a.start()
    yield a
    a.stop()
    # Finished segments are immutable (WORM); a test store must still go away.
    subprocess.run(["chattr", "-R", "-i", str(a.store)], capture_output=True)
