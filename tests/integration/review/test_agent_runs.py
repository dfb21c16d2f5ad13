"""`tollgate runs` and the report's runs table: a reviewer sees when the
agent recorded, with which guarantees, and which run ended unrecorded."""

from __future__ import annotations

import json
import signal
import time

import pytest

from agent.demo.agent_process import AgentProcess
from agent.demo.sandbox import Sandbox

pytestmark = pytest.mark.root


@pytest.fixture(scope="module")
def sandbox():
    """Its own namespaces: this test starts and kills agents."""
    with Sandbox(prefix="tgu", subject="tgusubject") as sb:
        yield sb


def test_runs_say_what_held_and_how_each_ended(sandbox, tmp_path):
    work = str(tmp_path / "agent")
    first = AgentProcess(sandbox, workdir=work, extra="[witness]\nenabled = false\n").start()
    first.stop()                                           # SIGTERM: a stop record
    second = AgentProcess(sandbox, workdir=work, extra="[witness]\nenabled = false\n")
    assert second.cli("keys", "init").returncode == 0
    second.start()
    second.stop(signal.SIGKILL)                            # no stop record
    time.sleep(0.2)
    after_kill = time.time_ns()
    # A command run while no agent runs writes to the store itself: not the killed run's.
    assert second.cli("rules", "apply", "--reason", "after the kill").returncode == 0
    third = AgentProcess(sandbox, workdir=work, extra="[witness]\nenabled = false\n").start()
    assert third.cli("rules", "remove", "--reason", "test").returncode == 0
    third.stop()                                           # the subjects free after it
    listed = json.loads(second.cli("runs", "--json", text=True).stdout)
    text = second.cli("runs", text=True).stdout
    html = second.cli("report", "--html", str(tmp_path / "r.html"), text=True)
    page = (tmp_path / "r.html").read_text() if html.returncode == 0 else html.stderr
    witness_off = "witness off: bypasses were not watched for"
    assert [r["sealed"] for r in listed] == [False, True, True]
    assert [r["witness"] for r in listed] == [False, False, False]
    assert listed[0]["ended"].startswith("stopped: ") and listed[0]["rules_left_in_place"]
    assert listed[0]["gaps"] == [witness_off, "store not sealed"]
    assert listed[1]["ended"] == "no stop record (killed or crashed)"
    assert listed[1]["gaps"] == [witness_off]
    assert listed[2]["ended"].startswith("stopped: ") and not listed[2]["rules_left_in_place"]
    assert listed[2]["gaps"] == [witness_off, "stopped with the rules removed: the subjects "
                                              "were free until the next start"]
    assert all(r["durability"] == "write" and r["data_plane"] == "native" for r in listed)
    assert listed[0]["started_ns"] < listed[0]["last_record_ns"] <= listed[1]["started_ns"]
    assert listed[1]["started_ns"] < listed[1]["last_record_ns"] < after_kill
    lines = text.splitlines()
    assert lines[0].startswith("STARTED") and len(lines) == 4
    assert " OFF " in lines[1] and " NO " in lines[1] and " yes " in lines[2]
    assert "Agent runs (3)" in page and "store not sealed" in page
