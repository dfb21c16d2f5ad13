"""A CLI that records while no agent runs (a replay's ACCESS, an ACK) leaves
the store as the agent would: the record sealed, the chain whole, and
saying it was written with no agent running."""

from __future__ import annotations

import subprocess
import sys
import time

from agent.store import Kind, StoreWriter, iter_records, verify
from agent.store.keys import SealKey, load_verification_key


def test_replay_with_no_agent_records_access_and_seals_it(open_dir):
    store, key = open_dir / "store", open_dir / "keys" / "seal.key"
    config = open_dir / "tollgate.toml"
    config.write_text(f'subjects = ["nobody"]\nrun_dir = "{open_dir}/run"\n'
                      f'[store]\npath = "{store}"\nkey_path = "{key}"\n')
    cli = [sys.executable, "-m", "agent.cli", "--config", str(config)]
    init = subprocess.run([*cli, "keys", "init"], check=True, capture_output=True, text=True)
    verification_key = init.stdout.strip().splitlines()[-1]
    w = StoreWriter(store, seal_key=SealKey(key))
    sid = w.append_json(Kind.SESSION_OPEN, {"client": ["10.0.0.1", 40000],
                                            "original_dst": ["10.0.0.2", 80], "time_ns": time.time_ns()})
    w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed",
                                       "client_bytes": 0, "server_bytes": 0})
    w.close()

    r = subprocess.run([*cli, "replay", str(sid)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    records = list(iter_records(store))
    assert [r.kind for r in records[-2:]] == [Kind.ACCESS, Kind.SEAL], records[-2:]
    assert records[-2].json()["offline"] is True     # not a (killed) agent's: review.runs
    report = verify(store, load_verification_key(verification_key))
    # the seal signs the chain up to the ACCESS record (only the seal itself follows)
    assert report.ok and report.keyed and report.sealed_upto == records[-2].seq, report
