"""The bench command, in its quick mode, still runs end to end and prints
every row of its table (no timing is asserted: that is the bench's job)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from bench.table import ROWS

ROOT = Path(__file__).resolve().parents[3]

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root (CI runs as root)")]


@pytest.mark.timeout(600)
def test_quick_bench_prints_every_row():
    knob = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
    polling_before = knob.read_text() if knob.exists() else None
    r = subprocess.run([sys.executable, "-m", "bench", "--quick"], cwd=ROOT,
                       capture_output=True, text=True, timeout=590)
    assert r.returncode == 0, r.stderr[-3000:]
    table = [line for line in r.stdout.splitlines() if line.startswith("| ")]
    # the latency measured again with the guest's halt polling on, and the knob put back
    if polling_before is not None:
        assert knob.read_text() == polling_before
    polled = next(line for line in table if line.startswith("| latency p50, guest halt polling"))
    assert ("n/a" in polled) == (polling_before != "0\n"), polled
    for row in ROWS:
        assert any(line.startswith(f"| {row}") for line in table), (row, r.stdout)
    assert "direct" in table[0] and "haproxy" in table[0]
    # the latency split: haproxy again under the ruleset the redirect needs,
    # and again behind the redirect itself (the subject's dial sent to it)
    for beside in ("haproxy with the agent's ruleset loaded", "haproxy behind the agent's redirect"):
        note = next(line for line in r.stdout.splitlines() if line.startswith(f"note: {beside}"))
        assert ", p99 " in note and note.count("tollgate's added: ") == 2, note
        # haproxy's pid metered on that path too: it did carry the trips
        assert float(re.search(r"CPU a round trip ([0-9.]+) us", note)[1]) > 1.0, note
        if polling_before == "0\n":
            assert f"note: guest halt polling 200 us: {beside}" in r.stdout
    assert "note: witness cost to traffic it does not proxy" in r.stdout


@pytest.mark.timeout(600)
@pytest.mark.parametrize("mode, figures", [
    ([], ("per_s", "cpu_us_per_conn", "main_us_per_conn", "relay_us_per_conn")),
    (["--latency", "--trips", "500"],
     ("p50_us", "p99_us", "cpu_us_per_trip", "main_us_per_trip", "relay_us_per_trip")),
], ids=["connection-rate", "latency"])
def test_paired_runs_measure_both_checkouts(mode, figures):
    """bench.pair against this checkout twice: one run each, with figures
    (the agent's CPU split by thread among them: its main thread accepts
    every connection, its relay threads carry every byte)."""
    r = subprocess.run([sys.executable, "-m", "bench.pair", str(ROOT), str(ROOT),
                        "--rounds", "1", "--seconds", "1", *mode], cwd=ROOT,
                       capture_output=True, text=True, timeout=590)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = [json.loads(line) for line in r.stdout.splitlines()]
    runs = [x for x in lines if "round" in x]
    assert [x["build"] for x in runs] == ["old", "new"]
    assert all(x[f] > 0 for x in runs for f in figures), runs
    assert [x["build"] for x in lines if "mean" in x] == ["old", "new"]


@pytest.mark.timeout(600)
def test_hops_times_both_relays_syscalls():
    """bench.hops: each relay's syscalls during ping-pong, per round trip;
    tollgate records each hop by copying into the mapped segment, no write."""
    r = subprocess.run([sys.executable, "-m", "bench.hops", "--trips", "30000", "--seconds", "0.5"],
                       cwd=ROOT, capture_output=True, text=True, timeout=590)
    assert r.returncode == 0, r.stderr[-3000:]
    got = {x["relay"]: x for x in map(json.loads, r.stdout.splitlines())}
    assert set(got) == {"haproxy", "tollgate", "haproxy, agent running"}
    for relay in got.values():
        assert relay["trips_timed"] > 100 and relay["p50_us"] > 0
        assert relay["syscalls"]["recvfrom"]["us_each"] > 0
    assert "writev" not in got["haproxy"]["syscalls"]
    assert "writev" not in got["haproxy, agent running"]["syscalls"]  # root's: not redirected
    writes = got["tollgate"]["syscalls"]
    assert sum(writes.get(w, {}).get("calls_per_trip", 0)
               for w in ("writev", "pwritev", "pwrite64", "write")) < 0.1, writes
