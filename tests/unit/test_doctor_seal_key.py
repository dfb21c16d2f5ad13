"""`tollgate doctor`'s seal_key check, on real files: without the key
nothing is sealed, and a key others can read lets them forge seals."""

from __future__ import annotations

import os

from agent.doctor import check_seal_key


def test_a_missing_key_fails_and_says_what_it_costs(tmp_path):
    c = check_seal_key(str(tmp_path / "seal.key"))
    assert not c.ok and "not sealed" in c.detail and "keys init" in c.fix


def test_a_key_others_can_read_fails(tmp_path):
    key = tmp_path / "seal.key"
    key.write_bytes(b"k" * 32)
    os.chmod(key, 0o644)
    c = check_seal_key(str(key))
    assert not c.ok and "forge" in c.detail and c.fix == f"chmod 0600 {key}"


def test_a_root_only_key_passes(tmp_path):
    key = tmp_path / "seal.key"
    key.write_bytes(b"k" * 32)
    os.chmod(key, 0o600)
    assert check_seal_key(str(key)).ok
