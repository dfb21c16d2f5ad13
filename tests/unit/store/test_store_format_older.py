"""Stores written by earlier format versions stay readable, verifiable and
appendable. Each fixture was written with store_forge.build_store(records=40)
by the last build that wrote its version, with its verification key and the
seal key as that writer left it:

- fixtures/format-v1: commit 876e568, hash SHA-256(header || payload);
- fixtures/format-v2: commit 0e18b75, hash SHA-256(header || SHA-256(payload)).

This build writes version 3, SHA-256(header || BLAKE3(payload))."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.store import Direction, Kind, SealKey, StoreWriter, verify
from agent.store.format import FORMAT_VERSION, HEADER_SIZE
from agent.store.keys import load_verification_key
from store_forge import flip, frame_spans

FIXTURES = Path(__file__).parent / "fixtures"
OLDER = (1, 2)


@pytest.fixture(params=OLDER, ids=[f"v{v}" for v in OLDER])
def old(request, tmp_path):
    """(store root, its version), a copy of the fixture."""
    root = tmp_path / f"v{request.param}"
    shutil.copytree(FIXTURES / f"format-v{request.param}", root)
    (root / "seal.key").chmod(0o600)
    return root, request.param


def versions(store: Path) -> list[int]:
    return [(store / name).read_bytes()[start + 2] for name, start, _, _ in frame_spans(store)]


def test_this_build_writes_version_3():
    assert FORMAT_VERSION == 3


def test_an_older_store_verifies(old):
    root, version = old
    assert set(versions(root / "store")) == {version}
    r = verify(root / "store", load_verification_key(root / "verification.key"))
    assert r.ok and r.keyed and r.records == 40 + r.seals + len(r.segments), r.failures


def test_a_bit_flip_in_an_older_payload_is_found(old):
    root, _ = old
    store = root / "store"
    name, start, end, rec = next(s for s in frame_spans(store) if s[3].kind == Kind.DATA)
    flip(store / name, start + HEADER_SIZE + 12, 3)
    r = verify(store, load_verification_key(root / "verification.key"))
    assert not r.ok and (r.failures[0].segment, r.failures[0].offset) == (name, start)


def test_an_upgraded_writer_chains_the_current_version_onto_an_older_one(old):
    root, version = old
    store = root / "store"
    w = StoreWriter(store, seal_key=SealKey(root / "seal.key"), segment_max_bytes=2500)
    for i in range(30):
        w.append_data(7, Direction(i % 2), b"after the upgrade %d" % i)
    w.close()
    seen = versions(store)
    assert seen[0] == version and seen[-1] == FORMAT_VERSION
    assert seen == sorted(seen)     # one switch, where the new writer took over
    r = verify(store, load_verification_key(root / "verification.key"))
    assert r.ok, r.failures
    name, start, _, _ = [s for s in frame_spans(store) if s[3].kind == Kind.DATA][-1]
    flip(store / name, start + HEADER_SIZE + 12, 3)   # and a new frame's payload is covered
    r = verify(store, load_verification_key(root / "verification.key"))
    assert not r.ok and (r.failures[0].segment, r.failures[0].offset) == (name, start)


def test_a_store_set_to_sha256_writes_version_2(tmp_path):
    """store.payload_hash = "sha256", through the daemon's constructor: every
    frame version 2 (FIPS-approved hashes only), and it verifies."""
    from agent.config import StoreConfig
    cfg = StoreConfig(path=str(tmp_path / "store"), payload_hash="sha256",
                      key_path=str(tmp_path / "no-key"))
    w = StoreWriter.from_config(cfg, maintain_interval_s=0)
    for i in range(5):
        w.append_data(3, Direction(i % 2), b"fips %d" % i)
    w.close()
    assert set(versions(tmp_path / "store")) == {2}
    assert verify(tmp_path / "store").ok
