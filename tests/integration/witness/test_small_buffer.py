"""An undersized ring buffer (perf_pages=1) and the guard off."""

from __future__ import annotations

import socket
import subprocess

import pytest

from agent.store import Kind, iter_records

from . import helpers
from .conftest import running_witness, witness_config
from .test_witness import SOCKET_TRY

PORT = 18451


@pytest.fixture(scope="module")
def witness(netns_inode, store, sessions):
    server = helpers.start_server(PORT)
    w = running_witness(witness_config(guard=False, perf_pages=1), store, sessions)
    yield w
    w.stop()
    server.kill()
    server.wait()


def test_overflow_becomes_an_events_lost_record(witness, store_dir):
    # Parallel subjects exec and connect far faster than one page can hold.
    burst = ("for i in $(seq 40); do (for j in $(seq 20); do /bin/true; done; "
             "python3 -c 'import socket\nfor k in range(50): "
             "socket.create_connection((\"127.0.0.1\", %d)).close()') & done; wait" % PORT)
    subprocess.run(helpers.subject_cmd(["sh", "-c", burst]), check=True, timeout=60)
    a = helpers.wait_alert(store_dir, type="events_lost")
    assert a["evidence"]["count"] > 0 and a["evidence"]["ring_buffer_pages"] == 1
    assert witness.statistics()["lost"] >= a["evidence"]["count"]
    kinds = [r.kind for r in iter_records(store_dir, strict=False)]
    assert Kind.ALERT in kinds


def test_raw_socket_without_guard_is_reported_not_refused(witness, store_dir, tmp_path):
    exe = helpers.copy_python(tmp_path, caps="cap_net_raw+ep")
    out = helpers.run_subject(SOCKET_TRY, str(int(socket.AF_INET6)), "58", python=exe)
    assert out["errno"] == 0
    a = helpers.wait_alert(store_dir, type="raw_socket", socket_family=10)
    assert a["evidence"]["refused"] is False
    assert not any(p.startswith("cgroup") for p in witness.statistics()["attached"])
