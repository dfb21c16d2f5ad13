import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

import small_disk
from agent.store.immutable import set_immutable

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]


def pytest_collection_modifyitems(items):
    for item in items:
        item.add_marker(pytest.mark.root)


@pytest.fixture
def root_only():
    if os.geteuid() != 0:
        pytest.skip("needs root")


@pytest.fixture
def open_dir(root_only):
    """A directory others can reach (pytest's tmp_path is 0700 root, which
    would make every permission test pass for the wrong reason)."""
    d = Path(tempfile.mkdtemp(prefix="tollgate-store-", dir="/var/tmp"))
    os.chmod(d, 0o755)
    yield d
    for p in d.rglob("*"):
        if p.is_file():
            set_immutable(p, False)
    shutil.rmtree(d)


@pytest.fixture
def small_tmpfs(root_only):
    d = Path(tempfile.mkdtemp(prefix="tollgate-tmpfs-"))
    with small_disk.tmpfs(d, "1m"):
        yield d
    d.rmdir()


def as_nobody(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([*NOBODY, *argv], capture_output=True, text=True)
