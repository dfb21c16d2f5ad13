"""The shipper against a real gRPC server (tests/fakes/cloud_logging.py)."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import blake3
import pytest
from google.logging.type import log_severity_pb2
from google.protobuf import json_format

from agent.alerts import AlertType, record_alert
from agent.ship import Shipper
from agent.ship.entries import insert_id
from agent.store.format import FORMAT_VERSION, Direction, Kind, encode_header
from agent.store.reader import iter_records
from ship_helpers import ship_config, write_session
from tests.fakes.clock import WarpClock

Severity = log_severity_pb2.LogSeverity
HERE = Path(__file__).parent


def records(store) -> list:
    return list(iter_records(store.dir))


def payload(entry) -> dict:
    return json_format.MessageToDict(entry.json_payload)


def expected_ids(store) -> set[str]:
    return {insert_id(store.store_id, r.seq) for r in records(store)}


def assert_whole_and_folded(server, store) -> None:
    """Every record present; duplicates only with the same id, time, body."""
    by_id = server.by_insert_id()
    assert set(by_id) == expected_ids(store)
    for copies in by_id.values():
        first = copies[0].SerializeToString(deterministic=True)
        assert all(c.SerializeToString(deterministic=True) == first for c in copies)


def cloud_hash(body: dict, kind: Kind, seq: int) -> str:
    """The record's hash from its cloud copy alone, as a reviewer would
    recompute it (format 1: over header + payload; 2: header + its SHA-256;
    3: header + its BLAKE3)."""
    raw = base64.b64decode(body["payload_b64"])
    version = int(body["format_version"])
    header = encode_header(kind, len(raw), seq, int(body["ts_ns"]), bytes.fromhex(body["prev"]),
                           version)
    inner = {1: raw, 2: hashlib.sha256(raw).digest(), 3: blake3.blake3(raw).digest()}[version]
    return hashlib.sha256(header + inner).hexdigest()


@pytest.mark.parametrize("old", [1, 2])
def test_a_store_spanning_the_format_upgrade_is_proven_from_the_cloud(server, tmp_path, old):
    import shutil
    from agent.store import SealKey, StoreWriter
    fixture = HERE.parents[1] / "unit" / "store" / "fixtures" / f"format-v{old}"
    root = tmp_path / "old"
    shutil.copytree(fixture, root)
    (root / "seal.key").chmod(0o600)
    w = StoreWriter(root / "store", seal_key=SealKey(root / "seal.key"))
    for i in range(5):
        w.append_data(9, Direction(i % 2), b"after the upgrade %d" % i)
    w.close()
    Shipper(ship_config(server, tmp_path / "state"), root / "store").run_once()
    recs = {r.seq: r for r in iter_records(root / "store")}
    bodies = {int(e.labels["seq"]): payload(e) for e in server.entries}
    assert set(bodies) == set(recs)
    assert {b["format_version"] for b in bodies.values()} == {old, FORMAT_VERSION}
    for seq, rec in recs.items():
        assert cloud_hash(bodies[seq], rec.kind, seq) == bodies[seq]["hash"] == rec.hash.hex()


def test_recorded_session_arrives_in_order_with_labels(server, store, tmp_path):
    s1 = write_session(store, chunks=12, subject="devin")
    s2 = write_session(store, chunks=6, subject="1001")
    alert = record_alert(store, AlertType.BYPASS, "connect not via proxy", pid=7)
    seal = store.append_json(Kind.SEAL, {"head": "00" * 32})
    store.sync()
    shipper = Shipper(ship_config(server, tmp_path / "state"), store.dir)
    result = shipper.run_once()

    recs = {r.seq: r for r in records(store)}
    assert result.records == len(recs)
    assert_whole_and_folded(server, store)
    got = {e.insert_id: e for e in server.entries}
    for seq, rec in recs.items():
        e = got[insert_id(store.store_id, seq)]
        assert e.timestamp.ToNanoseconds() == rec.ts_ns
        assert e.resource.type == "gce_instance"
        assert dict(e.resource.labels) == {"project_id": "proj", "instance_id": "1234567890",
                                           "zone": "europe-west1-b"}
        assert e.labels["host"] and e.labels["seq"] == str(seq)
        body = payload(e)
        raw = base64.b64decode(body["payload_b64"])
        assert body["format_version"] == FORMAT_VERSION
        assert cloud_hash(body, rec.kind, seq) == body["hash"] == rec.hash.hex()
    for seqs, subject in ((s1, "devin"), (s2, "1001")):
        arrived = [int(e.labels["seq"]) for e in server.entries
                   if e.labels.get("session") == str(seqs[0])]
        assert arrived == seqs  # every record of the session, in order
        for seq in seqs:
            assert got[insert_id(store.store_id, seq)].labels["subject"] == subject
    data = got[insert_id(store.store_id, s1[2])]
    assert data.severity == Severity.DEFAULT
    assert payload(data)["direction"] == "client"
    a = got[insert_id(store.store_id, s2[-1] + 1)]
    assert a.severity == Severity.ALERT and a.log_name == "projects/proj/logs/tollgate-alerts"
    assert payload(a)["record"]["id"] == alert["id"]
    assert got[insert_id(store.store_id, seal)].log_name == "projects/proj/logs/tollgate-seals"
    assert got[insert_id(store.store_id, s1[0])].log_name == "projects/proj/logs/tollgate"
    stats = shipper.statistics()
    assert stats.backlog_records == 0 and stats.oldest_age_s is None
    assert shipper.run_once().records == 0  # nothing resent


def test_faults_lose_nothing_and_fold(server, store, tmp_path, clock):
    for _ in range(20):
        write_session(store, chunks=12)
    store.sync()
    server.plan(("exhausted", 20), ("ok", 2), ("unavailable_s", 3700), ("ok", 1),
                ("drop", 3), ("ok", 1), ("slow", 2, 0.6), ("exhausted", 3))
    cfg = ship_config(server, tmp_path / "state", batch_entries=25, rpc_timeout_s=0.3,
                      retry_initial_s=1.0, retry_max_s=60.0)
    shipper = Shipper(cfg, store.dir, clock=clock.time, sleep=clock.sleep)
    shipper.run_once()

    assert clock.slept >= 3600  # an hour of outage, warped
    assert server.plan_left() == []  # every scripted fault was met
    assert_whole_and_folded(server, store)
    assert len(server.entries) > len(expected_ids(store))  # dropped responses resent
    stats = shipper.statistics()
    assert stats.retries >= 20 + 3 + 3 + 2 and stats.backlog_records == 0


def test_killed_mid_batch_resumes_at_cursor(server, store, tmp_path):
    for _ in range(10):
        write_session(store, chunks=8)
    store.sync()
    server.plan(("ok", 4), ("hang",))
    cfg = ship_config(server, tmp_path / "state", batch_entries=10)
    ship = {f.name: getattr(cfg.ship, f.name) for f in dataclasses.fields(cfg.ship)}
    child = subprocess.Popen([sys.executable, str(HERE / "ship_child.py"), str(store.dir),
                              json.dumps(ship)])
    try:
        assert server.hung.wait(30), "shipper never reached the hanging request"
        os.kill(child.pid, signal.SIGKILL)
        child.wait(10)
    finally:
        child.kill()
        server.release()
    cursor = json.loads((tmp_path / "state" / "cursor-main.json").read_text())
    assert 1 < cursor["next_seq"] < len(records(store))
    before = len(server.committed_requests)

    Shipper(cfg, store.dir).run_once()
    assert_whole_and_folded(server, store)
    resent = [int(e.labels["seq"]) for req in server.committed_requests[before:] for e in req
              if e.labels["kind"] not in ("segment_start", "seal", "alert")]
    assert min(resent) == cursor["next_seq"]  # resumed exactly at the cursor


def test_large_chunk_is_split_and_reassembles(server, store, tmp_path):
    sid = write_session(store, chunks=1)[0]
    big = [os.urandom(5 << 20), os.urandom(5 << 20)]
    seqs = [store.append_data(sid, Direction.SERVER, b) for b in big]
    store.sync()
    Shipper(ship_config(server, tmp_path / "state"), store.dir).run_once()

    assert all(size <= 10_000_000 and n <= 1000 for size, n in server.requests)
    assert len(server.requests) >= 3  # 14 MB of entries cannot go in one request
    for seq, data in zip(seqs, big):
        prefix = insert_id(store.store_id, seq) + "."
        parts = [e for e in server.entries if e.insert_id.startswith(prefix)]
        assert len(parts) > 1 and all(p.ByteSize() < 256 << 10 for p in parts)
        parts.sort(key=lambda p: p.split.index)
        assert [p.split.index for p in parts] == list(range(parts[0].split.total_splits))
        raw = b"".join(base64.b64decode(payload(p)["payload_b64"]) for p in parts)
        assert raw[9:] == data  # 9 bytes: the DATA head (session, direction)


@pytest.mark.parametrize("partial", [True, False], ids=["partial-errors", "bisect"])
def test_invalid_entry_kept_locally_and_tombstoned(server, store, tmp_path, partial):
    """partial: per-entry errors name it; else the batch is bisected to find it."""
    seqs = write_session(store, chunks=20)
    store.sync()
    bad_seq = seqs[7 if partial else 11]
    bad_id = insert_id(store.store_id, bad_seq)
    server.reject(lambda e: e.insert_id == bad_id, partial=partial)
    shipper = Shipper(ship_config(server, tmp_path / "state"), store.dir)
    shipper.run_once()

    by_id = server.by_insert_id()
    assert set(by_id) == (expected_ids(store) - {bad_id}) | {bad_id + ".tombstone"}
    tomb = payload(by_id[bad_id + ".tombstone"][0])
    rec = next(r for r in records(store) if r.seq == bad_seq)
    assert tomb["hash"] == rec.hash.hex() and tomb["rejected_insert_id"] == bad_id
    kept = json.loads((tmp_path / "state" / "quarantine" / f"{bad_id}.json").read_text())
    assert kept["entry"]["insertId"] == bad_id
    assert shipper.statistics().rejected == 1
    assert shipper.lanes[-1].cursor.next_seq == len(records(store))


def test_backlog_alert_raised_and_shipped_after_outage(server, store, tmp_path):
    # Warps, but pauses for real so the backlog watch sees the outage.
    clock = WarpClock(real_pause_s=0.01)
    server.clock = clock.time
    write_session(store, chunks=4)
    store.sync()
    server.plan(("unavailable_s", 900))
    cfg = ship_config(server, tmp_path / "state", max_backlog_age_s=120.0,
                      retry_initial_s=5.0, retry_max_s=30.0)
    shipper = Shipper(cfg, store.dir, alerts=store, clock=clock.time, sleep=clock.sleep)
    stop = threading.Event()
    runner = threading.Thread(target=shipper.run_forever, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _backlog_alerts(server):
            time.sleep(0.05)
    finally:
        stop.set()
        runner.join(10)
    # The loop shipped the alert; the warped clock may have made even that
    # fresh alert record "old" and raised another one just before the stop.
    # One pass ships whatever the loop left, so the store can be compared whole.
    shipper.run_once()
    alert = _backlog_alerts(server)[0]
    assert alert.severity == Severity.ALERT
    assert payload(alert)["record"]["evidence"]["backlog_records"] > 0
    assert_whole_and_folded(server, store)


def _backlog_alerts(server) -> list:
    return [e for e in server.entries if e.labels.get("kind") == "alert"
            and payload(e)["record"]["type"] == "ship_backlog"]


def test_cli_ship_once_and_one_shipper_per_state_dir(server, store, tmp_path):
    write_session(store, chunks=3)
    store.sync()
    state = tmp_path / "state"
    conf = tmp_path / "tollgate.toml"
    conf.write_text(f'subjects = ["nobody"]\n[store]\npath = "{store.dir}"\n[ship]\n'
                    f'enabled = true\nproject_id = "proj"\nendpoint = "{server.address}"\n'
                    f'insecure = true\ninstance_id = "1"\nzone = "z"\nstate_dir = "{state}"\n')
    holder = Shipper(ship_config(server, state), store.dir)  # holds the state dir
    cmd = [sys.executable, "-m", "agent.cli", "ship", "--once", "--config", str(conf), "--json"]
    busy = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parents[2])
    assert busy.returncode == 2 and "another shipper" in busy.stderr
    holder.close()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=HERE.parents[2])
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["result"]["records"] == len(records(store))
    assert_whole_and_folded(server, store)


def test_a_record_appended_between_runs_is_shipped_though_the_size_stays(server, store,
                                                                        tmp_path):
    """The active segment is preallocated: its size does not move with each
    record, so an idle shipper must look at the frames, not at the size."""
    write_session(store, chunks=2, subject="devin")
    for i in range(16):  # small records in a row: the chain maps the segment for them
        store.append_json(Kind.EVENT, {"event": "small", "i": i})
    shipper = Shipper(ship_config(server, tmp_path / "state"), store.dir)
    assert shipper.run_once().records > 0
    assert shipper.run_once().records == 0
    seg = max(store.dir.glob("*.seg"))
    size = seg.stat().st_size
    seq = store.append_json(Kind.EVENT, {"event": "later"})
    assert seg.stat().st_size == size
    assert shipper.run_once().records == 1
    assert insert_id(store.store_id, seq) in {e.insert_id for e in server.entries}
