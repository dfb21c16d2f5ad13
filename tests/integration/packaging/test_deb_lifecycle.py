"""The deb from build to purge, in the order ops live it. Tests run in file
order and share one installation (conftest.installed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest

from agent import config as config_mod

from .conftest import NETNS, REPO, UPGRADE_SUFFIX, run

TOLLGATE = "/usr/bin/tollgate"
CONFIG = Path("/etc/tollgate/tollgate.toml")
STORE = Path("/var/lib/tollgate")
SEAL_KEY = Path("/var/lib/tollgate-keys/seal.key")
UNIT = Path("/lib/systemd/system/tollgate.service")


def mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def doctor(cfg: Path, *, netns: str | None = None, wrap: list[str] | None = None) -> dict:
    r = run(*(wrap or []), TOLLGATE, "--config", str(cfg), "doctor", "--json", netns=netns,
            check=False)
    report = json.loads(r.stdout)
    assert r.returncode == (0 if report["ok"] else 1), r.stderr
    return {c["name"]: c for c in report["checks"]}


def apply_rules(cfg: Path) -> None:
    run(TOLLGATE, "--config", str(cfg), "rules", "apply", netns=NETNS)


def has_table(netns: str = NETNS) -> bool:
    return run("nft", "list", "table", "inet", "tollgate", netns=netns, check=False).returncode == 0


# -- the package itself ---------------------------------------------------------------

def test_lintian_reports_no_errors(debs):
    r = run("lintian", "--tag-display-limit", "0", str(debs.first), check=False)
    errors = [line for line in r.stdout.splitlines() if line.startswith("E:")]
    assert not errors and r.returncode == 0, r.stdout + r.stderr


def test_vagrantfile_is_valid_ruby():
    assert "Syntax OK" in run("ruby", "-c", str(REPO / "Vagrantfile")).stdout


def test_install_creates_config_store_and_key(installed):
    assert "VERIFICATION key is in" in installed and "move it OFF this host" in installed
    assert mode(CONFIG) == 0o600 and mode(STORE) == 0o700
    assert SEAL_KEY.exists() and mode(SEAL_KEY.parent / "verification.key") == 0o600
    assert os.path.realpath(TOLLGATE) == "/opt/tollgate/venv/bin/tollgate"


@pytest.mark.parametrize("name", ["tollgate.service", "tollgate-rules.service"])
def test_units_pass_systemd_analyze(installed, name):
    unit = UNIT.parent / name
    assert unit.read_text() == (REPO / "packaging" / name).read_text()
    r = run("systemd-analyze", "verify", str(unit), check=False)
    assert r.returncode == 0 and not r.stderr.strip(), r.stderr
    sec = run("systemd-analyze", "security", "--offline=true", str(unit), check=False)
    level = re.search(r"Overall exposure level for \S+: ([\d.]+)", sec.stdout)
    assert level and float(level.group(1)) < 5.0, sec.stdout[-500:]


def test_config_documents_every_key_with_its_default(installed, tmp_path):
    """Uncommenting every line of the shipped file must give the defaults back."""
    text = re.sub(r"^# ([a-z_]+ = |\[)", r"\1", CONFIG.read_text(), flags=re.M)
    text = re.sub(r"^subjects = .*$", 'subjects = ["nobody"]', text, flags=re.M)
    (tmp_path / "all.toml").write_text(text)
    loaded = config_mod.load(tmp_path / "all.toml")
    want = dataclasses.replace(config_mod.Config(subjects=("nobody",)), source=loaded.source)
    assert loaded == want


# -- doctor: healthy, then each prerequisite broken on purpose ------------------------

def test_doctor_all_ok_where_rules_are_applied(agent_config):
    apply_rules(agent_config)
    checks = doctor(agent_config, netns=NETNS)
    assert all(c["ok"] for c in checks.values()), checks
    assert {"bpf_syscall", "btf", "tracefs", "cgroup2", "nftables", "bcc", "subjects",
            "store", "seal_key", "ruleset", "ship", "clock"} <= set(checks)


def test_doctor_reports_deleted_rules(agent_config):
    run("nft", "delete", "table", "inet", "tollgate", netns=NETNS)
    try:
        c = doctor(agent_config, netns=NETNS)["ruleset"]
        assert not c["ok"] and "missing" in c["detail"] and "tollgate" in c["fix"]
    finally:
        apply_rules(agent_config)


def test_doctor_reports_store_not_writable(agent_config):
    store = agent_config.parent / "store"
    run("chattr", "+i", str(store))
    try:
        c = doctor(agent_config, netns=NETNS)["store"]
    finally:
        run("chattr", "-i", str(store))
    assert not c["ok"] and "not writable" in c["detail"] and c["fix"]


def test_doctor_reports_missing_tracefs(agent_config):
    # A private mount namespace: the host keeps its tracefs and debugfs.
    hide = ["unshare", "-m", "--propagation", "private", "sh", "-c",
            'umount -l /sys/kernel/debug 2>/dev/null; umount -l /sys/kernel/tracing; exec "$@"',
            "-"]
    c = doctor(agent_config, wrap=hide)["tracefs"]
    assert not c["ok"] and "not mounted" in c["detail"] and "mount -t tracefs" in c["fix"]
    assert Path("/sys/kernel/tracing/events").is_dir()


# -- the demo through the installed command ----------------------------------------------

def test_demo_runs_from_the_installed_package(installed):
    r = run(TOLLGATE, "demo", timeout=240, check=False)
    if r.returncode != 0 and "sb.up()" in r.stderr:
        # The sandbox's veth setup has been seen to race (agent/demo/sandbox.py,
        # link_lookup right after the move); one more try tells a race from a bug.
        r = run(TOLLGATE, "demo", timeout=240, check=False)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "recorded sessions" in r.stdout and "sandbox removed" in r.stdout, r.stdout[-2000:]


# -- upgrade, remove, purge -----------------------------------------------------------------

def test_upgrade_keeps_config_store_and_key(debs, installed):
    CONFIG.write_text(CONFIG.read_text().replace('# log_level = "info"', 'log_level = "debug"'))
    (STORE / "upgrade-canary").write_text("kept")
    key_before = hashlib.sha256(SEAL_KEY.read_bytes()).hexdigest()
    out = run("dpkg", "-i", str(debs.upgrade))
    version = run("dpkg-query", "-W", "-f=${Version}", "tollgate").stdout
    assert version == debs.version + UPGRADE_SUFFIX
    assert "sealing key created" not in out.stdout + out.stderr
    assert 'log_level = "debug"' in CONFIG.read_text().splitlines()
    assert (STORE / "upgrade-canary").read_text() == "kept" and mode(STORE) == 0o700
    assert hashlib.sha256(SEAL_KEY.read_bytes()).hexdigest() == key_before


def test_remove_leaves_rules_in_place(agent_config):
    apply_rules(agent_config)
    # dpkg in the test's netns: postrm sees (and must keep) that netns's rules.
    out = run("dpkg", "-r", "tollgate", netns=NETNS)
    assert "stay" in out.stdout and "fail closed" in out.stdout, out.stdout
    assert has_table() and not os.path.exists(TOLLGATE) and CONFIG.exists()


def test_purge_removes_rules_and_config_but_keeps_the_store(installed):
    out = run("dpkg", "-P", "tollgate", netns=NETNS)
    assert not has_table() and not CONFIG.parent.exists(), out.stdout
    assert (STORE / "upgrade-canary").exists() and SEAL_KEY.exists()
    assert "store and keys kept" in out.stdout


def test_purge_with_confirmation_deletes_the_store(debs, installed):
    run("dpkg", "-i", str(debs.first))
    run("dpkg", "-P", "tollgate", env={"TOLLGATE_PURGE_STORE": "yes"})
    assert not STORE.exists() and not SEAL_KEY.parent.exists()
