"""Stores written before format version 2 stay readable, verifiable and
appendable. fixtures/format-v1 was written by commit 876e568 (the last build
that wrote version 1: SHA-256 over header || payload) with
store_forge.build_store(records=40), with its verification key and the seal
key as that writer left it."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from agent.store import Direction, Kind, SealKey, StoreWriter, verify
from agent.store.format import FORMAT_VERSION, HEADER_SIZE
from agent.store.keys import load_verification_key
from store_forge import flip, frame_spans

FIXTURE = Path(__file__).parent / "fixtures" / "format-v1"


@pytest.fixture
def v1(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "v1")
    (tmp_path / "v1" / "seal.key").chmod(0o600)
    return tmp_path / "v1"


def versions(store: Path) -> list[int]:
    return [(store / name).read_bytes()[start + 2] for name, start, _, _ in frame_spans(store)]


def test_a_version_1_store_verifies(v1):
    assert set(versions(v1 / "store")) == {1}
    r = verify(v1 / "store", load_verification_key(v1 / "verification.key"))
    assert r.ok and r.keyed and r.records == 40 + r.seals + len(r.segments), r.failures


def test_a_bit_flip_in_a_version_1_payload_is_found(v1):
    store = v1 / "store"
    name, start, end, rec = next(s for s in frame_spans(store) if s[3].kind == Kind.DATA)
    flip(store / name, start + HEADER_SIZE + 12, 3)
    r = verify(store, load_verification_key(v1 / "verification.key"))
    assert not r.ok and (r.failures[0].segment, r.failures[0].offset) == (name, start)


def test_an_upgraded_writer_chains_version_2_onto_version_1(v1):
    store = v1 / "store"
    w = StoreWriter(store, seal_key=SealKey(v1 / "seal.key"), segment_max_bytes=2500)
    for i in range(30):
        w.append_data(7, Direction(i % 2), b"after the upgrade %d" % i)
    w.close()
    seen = versions(store)
    assert seen[0] == 1 and seen[-1] == FORMAT_VERSION == 2
    assert seen == sorted(seen)     # one switch, where the new writer took over
    r = verify(store, load_verification_key(v1 / "verification.key"))
    assert r.ok, r.failures
