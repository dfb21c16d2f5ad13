"""A command that reads the store, pointed at a path with no store (a
mistyped --config or store.path), says so in one line and creates nothing:
an empty table would read as "nothing recorded", and a report's ACCESS
record would start a new store there."""

from __future__ import annotations

import subprocess
import sys

import pytest

READERS = [["sessions"], ["alerts"], ["alerts", "show", "x"], ["alerts", "ack", "x", "--reason", "r"],
           ["runs"], ["replay", "1"], ["export", "1", "--pcap", "out.pcap"],
           ["report", "--html", "out.html"], ["verify"], ["ship", "--once"]]


@pytest.mark.parametrize("command", READERS, ids=lambda c: " ".join(c[:2]))
def test_a_command_given_no_store_says_so_and_creates_nothing(tmp_path, command):
    config = tmp_path / "tollgate.toml"
    store = tmp_path / "store"
    config.write_text(f'subjects = ["nobody"]\nrun_dir = "{tmp_path}/run"\n[store]\npath = "{store}"\n'
                      f'[ship]\nstate_dir = "{tmp_path}/ship"\n')
    r = subprocess.run([sys.executable, "-m", "agent.cli", "--config", str(config), *command],
                       capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr == f"tollgate: {store}: no store here (store.path in {config}); nothing was recorded there\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tollgate.toml"]


def test_verify_given_a_store_directory_that_is_not_there(tmp_path):
    r = subprocess.run([sys.executable, "-m", "agent.cli", "verify", "--store", str(tmp_path / "nope")],
                       capture_output=True, text=True, timeout=60)
    assert (r.returncode, r.stderr) == (2, f"tollgate: {tmp_path}/nope: no store here (--store); "
                                           "nothing was recorded there\n")
