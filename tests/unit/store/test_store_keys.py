"""The sealing key: created private, ratchets one way, erases the old key on disk."""

from __future__ import annotations

import stat

import pytest

from agent.store import SealKey, SealKeyError, init_key, load_verification_key
from agent.store import keys


def test_init_is_private_and_refuses_to_overwrite(tmp_path):
    path = tmp_path / "keys" / "seal.key"
    init_key(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(SealKeyError):
        init_key(path)
    init_key(path, force=True)


def test_ratchet_matches_the_verifier_and_erases_old_keys(tmp_path):
    path = tmp_path / "seal.key"
    k0 = init_key(path)
    key = SealKey(path)
    ratchet = keys.Ratchet(k0)
    seen = [k0]
    for epoch in range(1, 6):
        key.advance()
        assert key.epoch == epoch and key.mac_key() == ratchet.mac_key(epoch)
        seen.append(keys.next_key(seen[-1]))
        raw = path.read_bytes()
        assert all(old not in raw for old in seen[:-1])  # overwritten in place
    key.advance(9)
    assert SealKey(path).epoch == 9 and SealKey(path).mac_key() == ratchet.mac_key(9)
    with pytest.raises(ValueError):
        ratchet.mac_key(3)  # the verifier cannot go back either


def test_a_crash_between_slots_keeps_the_newest(tmp_path):
    path = tmp_path / "seal.key"
    k0 = init_key(path)
    raw = bytearray(path.read_bytes())
    raw[keys.SLOT_SPAN:] = keys._pack_slot(1, keys.next_key(k0), keys.key_id(k0))
    path.write_bytes(bytes(raw))  # both slots valid: the old one was not yet zeroed
    key = SealKey(path)
    assert key.epoch == 1 and k0 not in path.read_bytes()


def test_torn_key_file_is_an_error(tmp_path):
    path = tmp_path / "seal.key"
    init_key(path)
    path.write_bytes(b"\0" * 1024)
    with pytest.raises(SealKeyError):
        SealKey(path)


def test_verification_key_text_round_trip(tmp_path):
    k0 = init_key(tmp_path / "seal.key")
    text = keys.verification_key_text(k0)
    assert load_verification_key(text) == k0
    (tmp_path / "vk").write_text(text + "\n")
    assert load_verification_key(tmp_path / "vk") == k0
    with pytest.raises(SealKeyError):
        load_verification_key(text[:-2] + ("00" if text[-2:] != "00" else "11"))
