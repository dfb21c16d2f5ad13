"""TOML -> frozen dataclasses. Every bad value becomes one ConfigError that
names the file, the key and what is wrong; nothing else leaves this module.
"""

from __future__ import annotations

import ipaddress
import pwd
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

DEFAULT_PATH = Path("/etc/tollgate/tollgate.toml")


class ConfigError(Exception):
    """One line: '<file>: <key>: <what is wrong>'."""


def _port(v: int) -> str | None:
    return None if 1 <= v <= 65535 else "must be a port number from 1 to 65535"


def _positive(v: float) -> str | None:
    return None if v > 0 else "must be greater than 0"


def _nonneg(v: float) -> str | None:
    return None if v >= 0 else "must be 0 or more"


def _from_to(low: float, high: float):
    def check(v: float) -> str | None:
        return None if low <= v <= high else f"must be from {low} to {high}"
    return check


def _one_of(*choices: str):
    def check(v: str) -> str | None:
        return None if v in choices else f"must be one of {', '.join(map(repr, choices))}"
    return check


def _networks(v: tuple[str, ...]) -> str | None:
    for item in v:
        try:
            ipaddress.ip_network(item, strict=False)
        except ValueError:
            return f"{item!r} is not an IP address or network"
    return None


def _addresses(v: tuple[str, ...]) -> str | None:
    for item in v:
        try:
            ipaddress.ip_address(item)
        except ValueError:
            return f"{item!r} is not an IP address"
    return None


UID_MAX = (1 << 32) - 2   # (uid_t)-1 means "no change" to the kernel


def is_uid(subject: str) -> bool:
    return subject.isascii() and subject.isdigit()


def _uid(subject: str) -> int:
    """A uid as it is, with no lookup (the rules match the number, so a user
    that only a network directory knows can be confined before the network);
    a name through this host's user database (KeyError if unknown)."""
    return int(subject) if is_uid(subject) else pwd.getpwnam(subject).pw_uid


def unknown_users(subjects: tuple[str, ...] | list[str]) -> list[str]:
    """The subjects named by a user name this host cannot resolve."""
    missing = []
    for name in subjects:
        try:
            _uid(name)
        except KeyError:
            missing.append(name)
    return missing


def _users(v: tuple[str, ...]) -> str | None:
    if not v:
        return "must name at least one user"
    for name in v:
        if is_uid(name) and int(name) > UID_MAX:
            return f"uid {name} is out of range"
    uids = []
    for name in v:   # one lookup a name: a directory's may be slow
        try:
            uids.append(_uid(name))
        except KeyError:
            return f"user {name!r} does not exist"
    if 0 in uids:
        # The rules would send root's TCP, the agent's own upstream
        # connections included, back into the proxy.
        return "root cannot be a subject (the agent runs as root)"
    return None


def check(fn):
    return {"check": fn}


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    port: int = field(default=15001, metadata=check(_port))
    # Where redirected connections land; the ruleset redirects to loopback.
    listen: tuple[str, ...] = field(default=("127.0.0.1", "::1"), metadata=check(_addresses))
    # A relay thread's chunk: each costs three syscalls and a record, so
    # bigger ones relay more per CPU second (1 MiB against 256 KiB: bulk
    # 6-37 % faster in paired runs, bench/RESULTS.md). Also the most one
    # direction holds for a slow peer. At most 8 MiB: a relay read is one
    # record, and a record's payload (read + session head) must fit the
    # store's 16 MiB frame; an oversized append would fail the whole store.
    buffer_bytes: int = field(default=1 << 20, metadata=check(_from_to(1, 8 << 20)))
    connect_timeout_s: float = field(default=10.0, metadata=check(_positive))
    # Stopping (a restart, an upgrade), sessions in flight get this long to
    # end on their own before the rest are reset; new connections wait in
    # the backlog meanwhile. At most 20 s: the unit's TimeoutStopSec is 30.
    stop_grace_s: float = field(default=2.0, metadata=check(_from_to(0, 20)))
    # The metadata server would hand the subject the VM's service-account token.
    deny: tuple[str, ...] = field(default=("169.254.169.254/32", "fd00:ec2::254/128"),
                                  metadata=check(_networks))
    allow: tuple[str, ...] = field(default=(), metadata=check(_networks))
    # uvloop relays with less CPU per hop and per connection (bench/RESULTS.md).
    event_loop: str = field(default="uvloop", metadata=check(_one_of("uvloop", "asyncio")))
    # Who relays established sessions: "native" threads (agent/native, no GIL)
    # or the asyncio relay; "auto" is native unless store.durability is "fsync",
    # which only the asyncio relay does (it waits for group commit per chunk).
    data_plane: str = field(default="auto", metadata=check(_one_of("auto", "native", "python")))
    relay_threads: int = field(default=0, metadata=check(_nonneg))  # 0: one per CPU, up to 4


@dataclass(frozen=True, slots=True)
class DnsConfig:
    enabled: bool = True
    port: int = field(default=15053, metadata=check(_port))
    resolver: str = ""  # empty: first nameserver of /etc/resolv.conf


@dataclass(frozen=True, slots=True)
class StoreConfig:
    path: str = "/var/lib/tollgate"
    durability: str = field(default="write", metadata=check(_one_of("write", "fsync")))
    # "sha256" writes format 2, for sites bound to FIPS-approved hashes: ~5x
    # the CPU per relayed byte of "blake3" (format 3).
    payload_hash: str = field(default="blake3", metadata=check(_one_of("blake3", "sha256")))
    fsync_interval_ms: float = field(default=2.0, metadata=check(_positive))
    segment_max_bytes: int = field(default=64 << 20, metadata=check(_positive))
    segment_max_age_s: float = field(default=3600.0, metadata=check(_positive))
    seal_interval_s: float = field(default=1.0, metadata=check(_positive))
    seal_interval_bytes: int = field(default=1 << 20, metadata=check(_positive))
    key_path: str = "/var/lib/tollgate-keys/seal.key"
    retention_days: float = field(default=90.0, metadata=check(_nonneg))


@dataclass(frozen=True, slots=True)
class WitnessConfig:
    enabled: bool = True
    guard: bool = True
    match_window_ms: float = field(default=50.0, metadata=check(_positive))
    sweep_interval_s: float = field(default=2.0, metadata=check(_positive))
    # Ring buffer size in pages, rounded up to a power of two; a full buffer
    # loses events (counted, recorded as events_lost), so size for bursts.
    perf_pages: int = field(default=64, metadata=check(_positive))
    # Report every TCP state change, not only SYN_SENT/ESTABLISHED/CLOSE (costly:
    # the kernel then sends proxied connections' events too; bpf/tcp_connect.c).
    all_tcp_states: bool = False


@dataclass(frozen=True, slots=True)
class EnforceConfig:
    table: str = "tollgate"
    # The kernel notifies every ruleset change (enforce/monitor.py); this is
    # how long the table goes unread when none comes.
    watch_interval_s: float = field(default=5.0, metadata=check(_positive))


@dataclass(frozen=True, slots=True)
class ShipConfig:
    enabled: bool = False
    project_id: str = ""
    log_name: str = "tollgate"
    alert_log_name: str = "tollgate-alerts"
    seal_log_name: str = "tollgate-seals"
    credentials: str = ""  # key file path; empty: Application Default Credentials
    endpoint: str = ""     # host:port override (tests, private endpoints)
    instance_id: str = ""
    zone: str = ""
    batch_entries: int = field(default=500, metadata=check(_from_to(1, 1000)))
    max_backlog_age_s: float = field(default=300.0, metadata=check(_positive))
    # Plaintext channel, no credentials: for a loopback test server only.
    insecure: bool = False
    # Cursors and quarantined entries; kept out of the store directory,
    # which belongs to the store alone.
    state_dir: str = "/var/lib/tollgate-ship"
    # Cloud Logging takes at most 10 MB per request; leave room for framing.
    batch_bytes: int = field(default=9 << 20, metadata=check(_from_to(1, 10_000_000)))
    rpc_timeout_s: float = field(default=30.0, metadata=check(_positive))
    retry_initial_s: float = field(default=1.0, metadata=check(_positive))
    retry_max_s: float = field(default=60.0, metadata=check(_positive))
    poll_interval_s: float = field(default=1.0, metadata=check(_positive))


@dataclass(frozen=True, slots=True)
class Config:
    subjects: tuple[str, ...] = field(default=("devin",), metadata=check(_users))
    run_dir: str = "/run/tollgate"  # control socket; root only
    log_level: str = field(default="info",
                           metadata=check(_one_of("debug", "info", "warning", "error")))
    proxy: ProxyConfig = ProxyConfig()
    dns: DnsConfig = DnsConfig()
    store: StoreConfig = StoreConfig()
    witness: WitnessConfig = WitnessConfig()
    enforce: EnforceConfig = EnforceConfig()
    ship: ShipConfig = ShipConfig()
    source: str = field(default="<defaults>", metadata={"internal": True})
    # Subject names left out by load(..., confinable=True): not resolvable now.
    unresolved: tuple[str, ...] = field(default=(), metadata={"internal": True})

    def subject_uids(self) -> tuple[int, ...]:
        return tuple(_uid(s) for s in self.subjects)


def load(path: str | Path | None = None, *, required: bool = False,
         confinable: bool = False) -> Config:
    """Load a config file; a missing default file means built-in defaults.

    confinable: subject names this host cannot resolve now (at boot, before
    the network, a directory's users) are left out, into `unresolved`, so
    the rules can confine the others; ConfigError still if none is left."""
    p = Path(path) if path is not None else DEFAULT_PATH
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        if required or path is not None:
            raise ConfigError(f"{p}: file not found") from None
        return _validated(Config(), f"built-in defaults ({p} is absent)")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        doc = tomllib.loads(raw.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{p}: not valid TOML: {e}") from None
    unresolved: list[str] = []
    subjects = doc.get("subjects")
    if confinable and isinstance(subjects, list) and all(isinstance(s, str) for s in subjects):
        unresolved = unknown_users(subjects)
        if len(unresolved) < len(subjects):
            doc = {**doc, "subjects": [s for s in subjects if s not in unresolved]}
    cfg = _build(Config, doc, str(p), "")
    return replace(cfg, unresolved=tuple(unresolved)) if unresolved else cfg


def _validated(cfg: Config, source: str) -> Config:
    """Run the checks on defaults too (the default subject may not exist)."""
    return _build(Config, {}, source, "", check_defaults=True)


def _build(cls, doc: dict, source: str, prefix: str, check_defaults: bool = False):
    known = {f.name: f for f in fields(cls) if not f.metadata.get("internal")}
    for key in doc:
        if key not in known:
            raise ConfigError(f"{source}: {prefix}{key}: unknown key")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, f in known.items():
        key = prefix + name
        if name not in doc:
            value = getattr(cls(), name) if f.default is field else f.default
            if check_defaults and f.metadata.get("check"):
                _run_check(f, value, source, key)
            if hasattr(value, "__dataclass_fields__") and check_defaults:
                value = _build(type(value), {}, source, key + ".", True)
            values[name] = value
            continue
        values[name] = _convert(hints[name], doc[name], source, key)
        if f.metadata.get("check"):
            _run_check(f, values[name], source, key)
    obj = cls(**values)
    return replace(obj, source=source) if cls is Config else obj


def _run_check(f, value, source: str, key: str) -> None:
    problem = f.metadata["check"](value)
    if problem:
        raise ConfigError(f"{source}: {key}: {problem}")


def _convert(hint, value, source: str, key: str):
    if hasattr(hint, "__dataclass_fields__"):
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: {key}: must be a table ([{key}])")
        return _build(hint, value, source, key + ".")
    if typing.get_origin(hint) is tuple:
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ConfigError(f"{source}: {key}: must be a list of strings")
        return tuple(value)
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is int and isinstance(value, bool) or not isinstance(value, hint):
        raise ConfigError(f"{source}: {key}: must be {_type_name(hint)}, "
                          f"not {type(value).__name__} {value!r}")
    return value


def _type_name(hint) -> str:
    return {int: "an integer", float: "a number", str: "a string",
            bool: "true or false"}.get(hint, str(hint))
