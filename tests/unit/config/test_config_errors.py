"""Bad config values: one line naming file and key, exit code 2, no traceback."""

from __future__ import annotations

import subprocess
import sys

import pytest

from agent import config


def tollgate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "agent.cli", *args], capture_output=True,
                          text=True, timeout=60)


@pytest.mark.parametrize("body,needle", [
    ('subjects = ["nobody"]\nbogus = 1\n', "bogus: unknown key"),
    ('subjects = ["nobody"]\n[proxy]\nport = 70000\n', "proxy.port: must be a port number"),
    ('subjects = ["nobody"]\n[proxy]\nport = "x"\n', "proxy.port: must be an integer"),
    ('subjects = ["no-such-user-tg"]\n', "subjects: user 'no-such-user-tg' does not exist"),
    ('subjects = ["4294967295"]\n', "subjects: uid 4294967295 is out of range"),
    # the agent runs as root: its own upstream connections would come back to it
    ('subjects = ["nobody", "root"]\n', "subjects: root cannot be a subject"),
    ('subjects = ["0"]\n', "subjects: root cannot be a subject"),
    ('subjects = ["nobody"]\n[store]\ndurability = "sometimes"\n', "store.durability: must be one of"),
    ('subjects = ["nobody"]\n[store]\npayload_hash = "md5"\n', "store.payload_hash: must be one of"),
    ('subjects = ["nobody"]\n[proxy]\nevent_loop = "trio"\n', "proxy.event_loop: must be one of"),
    ('subjects = ["nobody"]\n[proxy]\ndeny = ["not-an-ip"]\n', "proxy.deny: 'not-an-ip'"),
    # a relay read is one record: past 8 MiB it could outgrow the store's frame
    ('subjects = ["nobody"]\n[proxy]\nbuffer_bytes = 16777216\n',
     "proxy.buffer_bytes: must be from 1 to 8388608"),
    # the unit's TimeoutStopSec (30 s) must cover the grace and the rest of a stop
    ('subjects = ["nobody"]\n[proxy]\nstop_grace_s = 25\n', "proxy.stop_grace_s: must be from 0 to 20"),
    ('subjects = ["root"\n', "not valid TOML"),
])
def test_bad_value_is_one_clear_line(tmp_path, body, needle):
    f = tmp_path / "tollgate.toml"
    f.write_text(body)
    r = tollgate("--config", str(f), "run")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"tollgate: {f}: ") and needle in lines[0]
    assert "Traceback" not in r.stderr


def test_missing_file_named(tmp_path):
    r = tollgate("--config", str(tmp_path / "nope.toml"), "run")
    assert r.returncode == 2 and r.stderr.strip().endswith("nope.toml: file not found")


def test_good_file_loads_typed(tmp_path):
    f = tmp_path / "t.toml"
    f.write_text('subjects = ["nobody"]\n[store]\ndurability = "fsync"\nfsync_interval_ms = 3\n')
    cfg = config.load(f)
    assert cfg.store.durability == "fsync" and cfg.store.fsync_interval_ms == 3.0
    assert cfg.subject_uids() == (65534,)
    assert cfg.proxy.port == 15001


def test_defaults_are_checked_and_named_as_defaults(monkeypatch):
    """No config file: built-in defaults, whose subject must exist too."""
    monkeypatch.setattr(config, "DEFAULT_PATH", config.Path("/nonexistent/tollgate.toml"))
    import pwd
    try:
        pwd.getpwnam("devin")
    except KeyError:
        with pytest.raises(config.ConfigError, match=r"^built-in defaults \(/nonexistent/"
                           r"tollgate.toml is absent\): subjects: user 'devin' does not exist$"):
            config.load()
    else:
        assert config.load().subjects == ("devin",)


def test_payload_hash_choices_are_the_store_formats(tmp_path):
    """config may not import the store (layering), so it names the hashes
    itself: they must stay the ones the store can write, no more, no fewer."""
    import re

    from agent.store.format import PAYLOAD_HASH_VERSION
    f = tmp_path / "t.toml"
    f.write_text('subjects = ["nobody"]\n[store]\npayload_hash = "none-such"\n')
    with pytest.raises(config.ConfigError) as e:
        config.load(f)
    assert set(re.findall(r"'([^']+)'", str(e.value).split("must be one of")[1])) \
        == set(PAYLOAD_HASH_VERSION)
    for name in PAYLOAD_HASH_VERSION:
        f.write_text(f'subjects = ["nobody"]\n[store]\npayload_hash = "{name}"\n')
        assert config.load(f).store.payload_hash == name


def test_the_longest_stop_grace_fits_in_the_units_stop_timeout():
    """systemd kills an agent still stopping after TimeoutStopSec: the
    grace's bound must leave the rest of a stop (store, witness) time."""
    import re
    from dataclasses import fields
    unit = (config.Path(__file__).resolve().parents[3] / "packaging" / "tollgate.service")
    timeout = int(re.search(r"^TimeoutStopSec=(\d+)$", unit.read_text(), re.M).group(1))
    [grace] = [f for f in fields(config.ProxyConfig) if f.name == "stop_grace_s"]
    check = grace.metadata["check"]
    assert check(timeout - 10 + 0.1) is not None, "a grace this long leaves under 10 s"


def test_the_hand_over_fits_in_the_units_descriptor_store(monkeypatch):
    """Sessions handed to the next agent past what systemd stores would be
    dropped by it unsaid: the hand-over's bound is the unit's store, which
    the unit tells the agent (systemd 252 does not)."""
    import re
    from agent.proxy import handover
    unit = (config.Path(__file__).resolve().parents[3] / "packaging" / "tollgate.service").read_text()
    most = int(re.search(r"^FileDescriptorStoreMax=(\d+)$", unit, re.M).group(1))
    told = re.search(r"^Environment=TOLLGATE_FDSTORE=(\d+)$", unit, re.M).group(1)
    monkeypatch.delenv("FDSTORE", raising=False)
    monkeypatch.setenv("TOLLGATE_FDSTORE", told)
    assert handover.most() == 0                    # no service manager
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert int(told) == most and 1000 <= handover.most() and 2 * handover.most() + 16 <= most


def test_a_uid_is_a_subject_without_a_lookup(tmp_path):
    """A user only a network directory knows cannot be resolved before the
    network; listed by uid, the rules need no lookup. A name still must."""
    import pwd
    uid = next(u for u in range(4242, 5242) if not _has_uid(pwd, u))
    f = tmp_path / "t.toml"
    f.write_text(f'subjects = ["nobody", "{uid}"]\n')
    assert config.load(f).subject_uids() == (65534, uid)
    assert config.unknown_users(["nobody", str(uid), "no-such-user-tg", "²"]) == [
        "no-such-user-tg", "²"]


def _has_uid(pwd, uid: int) -> bool:
    try:
        pwd.getpwuid(uid)
    except KeyError:
        return False
    return True


def test_confinable_leaves_out_only_names_that_do_not_resolve(tmp_path):
    """What tollgate-rules.service loads at boot: the others are confined;
    with none left, the error names the user as a plain load does."""
    f = tmp_path / "t.toml"
    f.write_text('subjects = ["nobody", "no-such-user-tg"]\n')
    cfg = config.load(f, confinable=True)
    assert cfg.subjects == ("nobody",) and cfg.unresolved == ("no-such-user-tg",)
    f.write_text('subjects = ["no-such-user-tg"]\n')
    with pytest.raises(config.ConfigError, match="user 'no-such-user-tg' does not exist"):
        config.load(f, confinable=True)
