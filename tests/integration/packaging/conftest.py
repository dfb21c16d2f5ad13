"""The deb's whole life on this machine: build two versions, install,
doctor, demo, upgrade, remove, purge. Rule checks run in a network namespace
of their own (tgpkg), so the host's rules are never touched; the package is
purged at the end whatever happens, leaving the machine as found."""

from __future__ import annotations

import os
import shutil
import subprocess
import tomllib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
NETNS = "tgpkg"
UPGRADE_SUFFIX = "+pkgtest1"
STATE_DIRS = ("/var/lib/tollgate", "/var/lib/tollgate-keys", "/var/lib/tollgate-ship")
TOOLS = ("dpkg-deb", "lintian", "systemd-analyze", "systemd-nspawn", "ruby", "nft", "ip",
         "nsenter", "unshare", "chattr")

pytestmark = pytest.mark.root


def pytest_collection_modifyitems(items):
    why = _cannot_run()
    for item in items:
        if why and "packaging" in str(item.fspath):
            item.add_marker(pytest.mark.skip(reason=why))


def _cannot_run() -> str | None:
    if os.geteuid() != 0:
        return "needs root (CI runs as root)"
    missing = [t for t in TOOLS if not shutil.which(t)]
    if missing:
        return f"missing tools: {', '.join(missing)} (run packaging/dev-setup.sh)"
    return None


def run(*argv: str, netns: str | None = None, check: bool = True, timeout: float = 300,
        env: dict | None = None) -> subprocess.CompletedProcess:
    """A command, optionally in the test's network namespace; output kept for asserts.
    nsenter, not `ip netns exec`: that one remounts /sys, hiding tracefs."""
    prefix = ["nsenter", f"--net=/run/netns/{netns}"] if netns else []
    r = subprocess.run([*prefix, *argv], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    if check and r.returncode != 0:
        raise AssertionError(f"{' '.join(argv)} -> {r.returncode}\n{r.stdout}\n{r.stderr}")
    return r


@dataclass(frozen=True)
class Debs:
    first: Path
    upgrade: Path
    version: str


def _build(out: Path, version: str) -> Path:
    env = {"TOLLGATE_DEB_DIR": str(out), "TOLLGATE_VERSION": version}
    r = run(str(REPO / "packaging" / "build-deb.sh"), env=env, timeout=600)
    return Path(r.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="session")
def debs(tmp_path_factory) -> Debs:
    """Both versions at once: each build is mostly pip, which leaves a CPU free."""
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    out = tmp_path_factory.mktemp("debs")
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(_build, out, version)
        upgrade = pool.submit(_build, out, version + UPGRADE_SUFFIX)
        return Debs(first.result(), upgrade.result(), version)


def _preexisting() -> str | None:
    if run("dpkg-query", "-W", "-f=${Status}", "tollgate", check=False).stdout.strip():
        return "the tollgate package is already installed here"
    found = [d for d in (*STATE_DIRS, "/etc/tollgate", "/opt/tollgate") if os.path.exists(d)]
    return f"would overwrite existing {', '.join(found)}" if found else None


@pytest.fixture(scope="module")
def installed(debs):
    """The first version installed; purged (store too) and netns gone afterwards."""
    why = _preexisting()
    if why:
        pytest.skip(why)
    run("ip", "netns", "add", NETNS)
    try:
        r = run("dpkg", "-i", str(debs.first))
        yield r.stdout + r.stderr
    finally:
        run("dpkg", "-P", "tollgate", check=False, env={"TOLLGATE_PURGE_STORE": "yes"})
        for d in STATE_DIRS:  # a failed purge must not leave evidence dirs behind
            if os.path.exists(d):
                run("chattr", "-R", "-i", d, check=False)
                shutil.rmtree(d, ignore_errors=True)
        run("ip", "netns", "del", NETNS, check=False)


@pytest.fixture(scope="module")
def agent_config(installed, tmp_path_factory) -> Path:
    """A config of the test's own: subject `nobody` (exists everywhere, sends
    nothing in the test's netns), store, run dir and sealing key (made as the
    install makes one) in a temporary directory."""
    work = tmp_path_factory.mktemp("pkgagent")
    store = work / "store"
    store.mkdir(mode=0o700)
    cfg = work / "tollgate.toml"
    cfg.write_text(f'subjects = ["nobody"]\nrun_dir = "{work}/run"\n'
                   f'[store]\npath = "{store}"\nkey_path = "{work}/keys/seal.key"\n')
    run("/usr/bin/tollgate", "--config", str(cfg), "keys", "init")   # the installed one
    yield cfg
    run("chattr", "-R", "-i", str(work), check=False)
