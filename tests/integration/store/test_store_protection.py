"""The subject cannot read, list or change the store; nobody non-root clears the flag."""

from __future__ import annotations

import os
import stat

from agent.demo.sandbox import wait_for
from agent.store import Direction, StoreWriter, verify
from agent.store.immutable import is_immutable, set_immutable
from agent.store.reader import segment_paths
from conftest import as_nobody

CLEAR_FLAG = """
import fcntl, os, struct, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.ioctl(fd, 0x40086602, bytearray(struct.pack("=l", 0)))
"""


def _store(open_dir):
    store = open_dir / "store"
    w = StoreWriter(store, segment_max_bytes=1000)
    for i in range(20):
        w.append_data(1, Direction.CLIENT, b"s" * 200)
    return store, w


def test_finished_segments_are_immutable_the_active_one_is_not(open_dir):
    store, w = _store(open_dir)
    paths = segment_paths(store)
    assert len(paths) > 2
    # In "write" mode the newest finished segment is synced and sealed off in
    # a thread: it becomes immutable soon after the rotation, not during it.
    wait_for(lambda: all(is_immutable(p) for p in paths[:-1]), 15, what="finished segments immutable")
    assert not is_immutable(paths[-1])
    assert w.statistics()["immutable"] == "supported"
    try:
        with open(paths[0], "ab") as f:
            f.write(b"x")
        raise AssertionError("root appended to an immutable segment")
    except PermissionError:
        pass
    w.append_data(1, Direction.SERVER, b"still appending")
    w.close()
    assert verify(store).ok


def test_subject_cannot_read_or_list_the_store(open_dir):
    store, w = _store(open_dir)
    assert stat.S_IMODE(store.stat().st_mode) == 0o700 and store.stat().st_uid == 0
    active = segment_paths(store)[-1]
    assert as_nobody("ls", str(store)).returncode != 0
    assert as_nobody("cat", str(active)).returncode != 0
    assert as_nobody("sh", "-c", f"echo x >> {active}").returncode != 0
    w.close()


def test_non_root_cannot_clear_the_flag_even_with_open_permissions(open_dir):
    store, w = _store(open_dir)
    w.close()
    seg = segment_paths(store)[0]
    os.chmod(store, 0o755)
    set_immutable(seg, False)
    os.chmod(seg, 0o666)  # permissions wide open: only the flag protects it now
    set_immutable(seg, True)
    r = as_nobody("/usr/bin/python3", "-c", CLEAR_FLAG, str(seg))
    assert r.returncode != 0 and "Operation not permitted" in r.stderr
    assert as_nobody("chattr", "-i", str(seg)).returncode != 0
    assert as_nobody("sh", "-c", f"echo x >> {seg}").returncode != 0
    assert as_nobody("rm", "-f", str(seg)).returncode != 0 or seg.exists()
    assert is_immutable(seg) and seg.exists()
    assert verify(store).ok


def test_reopen_after_crash_mid_rotation(open_dir):
    """The active segment was made immutable before the next one existed."""
    store, w = _store(open_dir)
    w.close()
    last = segment_paths(store)[-1]
    assert set_immutable(last, True) is None
    w = StoreWriter(store, segment_max_bytes=1000)
    w.append_data(2, Direction.CLIENT, b"after the crash")
    w.close()
    assert verify(store).ok
