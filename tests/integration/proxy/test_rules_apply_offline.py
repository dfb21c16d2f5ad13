"""`tollgate rules apply` with no agent running, as tollgate-rules.service
runs it at boot before the network: a subject name that cannot be resolved
yet (a directory's user) must not leave the other subjects free."""

from __future__ import annotations

import json
import pwd
import sys

import pytest

from agent.demo.sandbox import CORP_V4, Sandbox, wait_for
from agent.demo.servers import port_open
from agent.store import Kind, iter_records

PORT = 7005
LISTENER = ("import socket, time; s = socket.create_server(('0.0.0.0', %d)); time.sleep(60)"
            % PORT)
CONNECT = (f"import socket; socket.create_connection(('{CORP_V4}', {PORT}), timeout=3).close(); "
           "print('connected')")
UNKNOWN = "no-such-user-tg"


@pytest.fixture
def sandbox():
    """Its own namespaces: the suite's agent owns the shared sandbox's rules."""
    sb = Sandbox(prefix="tgr", subject="tgrsubject").up()
    sb.spawn(sb.corp, [sys.executable, "-c", LISTENER])
    wait_for(lambda: port_open(sb, sb.corp, CORP_V4, PORT), 15, what="listener")
    yield sb
    sb.down()


def subject_connects(sb: Sandbox) -> str:
    r = sb.subject_run([sys.executable, "-c", CONNECT], text=True)
    return r.stdout.strip() or r.stderr.strip().splitlines()[-1]


def test_an_unresolvable_subject_name_leaves_the_others_confined(sandbox, tmp_path):
    store = tmp_path / "store"
    config = tmp_path / "tollgate.toml"
    config.write_text(f'subjects = ["{sandbox.subject}", "{UNKNOWN}"]\n'
                      f'run_dir = "{tmp_path}/run"\n[store]\npath = "{store}"\n'
                      f'key_path = "{tmp_path}/keys/seal.key"\n')
    assert subject_connects(sandbox) == "connected"     # nothing in the way yet
    r = sandbox.run(sandbox.bastion, [sys.executable, "-m", "agent.cli", "--config",
                                      str(config), "rules", "apply", "--reason", "boot"],
                    text=True)
    assert r.returncode == 2 and r.stdout.strip() == "rules applied", r
    assert r.stderr.strip() == (f"tollgate: {config}: subjects: {UNKNOWN}: cannot be "
                                "resolved now, so not confined (list by uid); the others "
                                "are confined")
    listed = json.loads(sandbox.run(sandbox.bastion, ["nft", "-j", "list", "set", "inet",
                                                      "tollgate", "subjects"]).stdout)
    [elements] = [o["set"].get("elem") for o in listed["nftables"] if "set" in o]
    assert elements == [pwd.getpwnam(sandbox.subject).pw_uid]
    assert "Connection refused" in subject_connects(sandbox)
    events = [json.loads(rec.payload) for rec in iter_records(store)
              if rec.kind == Kind.EVENT]
    assert events[-1]["event"] == "rules_applied" and events[-1]["unresolved"] == [UNKNOWN]
