"""`tollgate doctor`: is this host able to run the agent, and is it running it?

Each check returns one Check: a name, whether it passed, what it saw, and on
failure the one thing the operator should do. A check that does not apply
here (shipping disabled, no time daemon to ask) passes and says why. No check
changes the host: the store is probed with access(2), never written.
"""

from __future__ import annotations

import ctypes
import os
import platform
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from agent import config as config_mod
from agent.config import Config, ConfigError, WitnessConfig

MIN_FREE_BYTES = 1 << 30
MIN_YEAR = 2024
BTF_PATH = Path("/sys/kernel/btf/vmlinux")
TRACEPOINT = ("sock", "inet_sock_set_state")


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def passed(name: str, detail: str) -> Check:
    return Check(name, True, detail)


def failed(name: str, detail: str, fix: str) -> Check:
    return Check(name, False, detail, fix)


# -- the kernel ---------------------------------------------------------------------

_BPF_MAP_CREATE, _BPF_MAP_TYPE_ARRAY = 0, 2
_SYS_BPF = {"x86_64": 321, "aarch64": 280}


def check_bpf_syscall() -> Check:
    """Create (and close) a one-slot array map: the smallest thing bpf(2) does."""
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        return passed("bpf_syscall", f"skipped: unknown syscall number on {platform.machine()}")
    libc = ctypes.CDLL(None, use_errno=True)
    attr = (ctypes.c_uint32 * 32)(_BPF_MAP_TYPE_ARRAY, 4, 4, 1)  # type, key, value, entries
    fd = libc.syscall(nr, _BPF_MAP_CREATE, ctypes.byref(attr), ctypes.sizeof(attr))
    if fd < 0:
        err = ctypes.get_errno()
        return failed("bpf_syscall", f"bpf(BPF_MAP_CREATE) failed: {os.strerror(err)}",
                      "run as root with CAP_BPF on a kernel built with CONFIG_BPF_SYSCALL=y")
    os.close(fd)
    return passed("bpf_syscall", "bpf(2) creates maps")


def check_btf() -> Check:
    if os.access(BTF_PATH, os.R_OK):
        return passed("btf", f"{BTF_PATH} ({BTF_PATH.stat().st_size} bytes)")
    return failed("btf", f"{BTF_PATH} is missing",
                  "use a kernel built with CONFIG_DEBUG_INFO_BTF=y (Debian's kernels are)")


def tracefs_dir() -> Path:
    """The directory BCC itself uses: debugfs's tracing if present, else tracefs."""
    debug = Path("/sys/kernel/debug/tracing")
    return debug if debug.exists() else Path("/sys/kernel/tracing")


def check_tracefs() -> Check:
    root = tracefs_dir()
    if not (root / "events").is_dir():
        return failed("tracefs", f"tracefs is not mounted at {root}",
                      "mount -t tracefs tracefs /sys/kernel/tracing")
    tp = root / "events" / TRACEPOINT[0] / TRACEPOINT[1] / "id"
    if not tp.exists():
        return failed("tracefs", f"tracepoint {':'.join(TRACEPOINT)} is missing under {root}",
                      "use a kernel of 4.16 or later with CONFIG_INET and tracepoints")
    return passed("tracefs", f"{root}, tracepoint {':'.join(TRACEPOINT)} present")


def check_cgroup2(guard: bool = True) -> Check:
    """The guard attaches at the root of the cgroup2 hierarchy, wherever it is."""
    from agent.witness.loader import cgroup2_root
    if not guard:
        return passed("cgroup2", "skipped: witness guard is off")
    root = cgroup2_root()
    if root is None:
        return failed("cgroup2", "no cgroup2 file system is mounted",
                      "mount -t cgroup2 none /sys/fs/cgroup")
    return passed("cgroup2", f"mounted at {root}")


def check_nftables() -> Check:
    from agent.enforce import Nft, NftError
    try:
        Nft().run([{"list": {"tables": {"family": "inet"}}}])
    except NftError as e:
        return failed("nftables", str(e),
                      "apt install nftables python3-nftables; run as root (CAP_NET_ADMIN)")
    return passed("nftables", "nft lists tables")


def check_bcc_headers() -> Check:
    build = Path("/lib/modules") / os.uname().release / "build"
    try:
        import bcc  # noqa: F401 - importable is half of the check
    except ImportError:
        return failed("bcc", "python3-bpfcc is not importable", "apt install python3-bpfcc")
    if not (build / "include").is_dir():
        return failed("bcc", f"no kernel headers at {build}",
                      "apt install linux-headers-$(uname -r) (on a kernel without a "
                      "package: link a matching headers tree there)")
    return passed("bcc", f"bcc importable, headers at {build.resolve()}")


# -- the config and what it names -------------------------------------------------


def load_config(path: str | None) -> tuple[Check, Config | None]:
    try:
        cfg = config_mod.load(path)
    except ConfigError as e:
        return failed("config", str(e), f"edit {path or config_mod.DEFAULT_PATH}"), None
    return passed("config", f"{cfg.source} loads"), cfg


def raw_subjects(path: str | None) -> list[str]:
    """The subjects as written, for when the config as a whole does not load."""
    try:
        with open(path or config_mod.DEFAULT_PATH, "rb") as f:
            value = tomllib.load(f).get("subjects", list(Config().subjects))
    except (OSError, tomllib.TOMLDecodeError):
        return list(Config().subjects)
    return [str(v) for v in value] if isinstance(value, list) else []


def check_subjects(subjects: list[str]) -> Check:
    missing = config_mod.unknown_users(subjects)
    if not subjects:
        return failed("subjects", "no subject users are configured", "set subjects = [\"USER\"]")
    if missing:
        return failed("subjects", f"no such user: {', '.join(missing)}",
                      f"create the user (adduser {missing[0]}) or fix subjects in the config")
    return passed("subjects", ", ".join(subjects))


def check_store(path: str) -> Check:
    p = Path(path)
    if not p.is_dir():
        return failed("store", f"{p} does not exist", f"install -d -m 0700 {p}")
    # access(2) as root still refuses read-only mounts and immutable directories.
    if not os.access(p, os.W_OK):
        return failed("store", f"{p} is not writable (read-only mount or chattr +i)",
                      f"remount it read-write or chattr -i {p}")
    st = os.statvfs(p)
    free = st.f_bavail * st.f_frsize
    if free < MIN_FREE_BYTES:
        return failed("store", f"{p}: only {free >> 20} MiB free",
                      "free space or move store.path to a larger file system")
    return passed("store", f"{p} writable, {free >> 30} GiB free")


def check_seal_key(path: str) -> Check:
    p = Path(path)
    if not p.exists():
        return failed("seal_key", f"{p} is missing: the store is not sealed, so root could "
                      "rewrite it undetected", "tollgate keys init, then restart the agent")
    if p.stat().st_mode & 0o077:
        return failed("seal_key", f"{p} is readable by others: they could forge seals",
                      f"chmod 0600 {p}")
    return passed("seal_key", str(p))


def check_ruleset(cfg: Config) -> Check:
    from agent.daemon import ruleset_for
    from agent.enforce import Nft, NftError
    from agent.enforce.apply import verify
    try:
        problems = verify(Nft(), ruleset_for(cfg))
    except NftError as e:
        return failed("ruleset", str(e), "fix nftables first (see the nftables check)")
    if problems:
        return failed("ruleset", "; ".join(problems),
                      "systemctl start tollgate (or: tollgate rules apply)")
    return passed("ruleset", f"table inet {cfg.enforce.table} matches the config")


def check_ship(cfg: Config) -> Check:
    if not cfg.ship.enabled:
        return passed("ship", "skipped: ship.enabled is false")
    problem = ship_credentials_problem(cfg)
    if problem:
        return failed("ship", problem, "set ship.credentials to a root-only key file, or give "
                      "the VM a service account with roles/logging.logWriter")
    target = cfg.ship.endpoint or "logging.googleapis.com:443"
    host, _, port = target.rpartition(":")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=5).close()
    except (OSError, ValueError) as e:
        return failed("ship", f"cannot reach {target}: {e}",
                      "allow egress to logging.googleapis.com:443 (or Private Google Access)")
    return passed("ship", f"credentials found, {target} reachable")


def ship_credentials_problem(cfg: Config) -> str | None:
    if cfg.ship.insecure:
        return None
    from agent.ship.transport import SCOPES, TransportError, _check_key_file
    if cfg.ship.credentials:
        try:
            _check_key_file(cfg.ship.credentials)
        except TransportError as e:
            return str(e)
        return None
    import google.auth
    import google.auth.exceptions
    try:
        google.auth.default(scopes=SCOPES)
    except google.auth.exceptions.DefaultCredentialsError as e:
        return f"no Application Default Credentials: {str(e).splitlines()[0]}"
    return None


# -- the clock ---------------------------------------------------------------------


def check_clock() -> Check:
    year = time.gmtime().tm_year
    if year < MIN_YEAR:
        return failed("clock", f"the clock says {year}",
                      "set the time (chronyc makestep, or timedatectl set-ntp true)")
    synced = clock_synced()
    if synced is False:
        return failed("clock", "the clock is not synchronized",
                      "start a time daemon (apt install chrony)")
    how = "synchronized" if synced else "sync not checked (no chrony or timedatectl)"
    return passed("clock", f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}, {how}")


def clock_synced() -> bool | None:
    """True/False when a time daemon can tell; None when none can be asked."""
    probes = [(["chronyc", "-n", "tracking"], lambda out: "Not synchronised" not in out)]
    if Path("/run/systemd/system").is_dir():
        probes.append((["timedatectl", "show", "-p", "NTPSynchronized", "--value"],
                       lambda out: out.strip() == "yes"))
    for argv, judge in probes:
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=5)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if r.returncode == 0:
            return judge(r.stdout)
    return None


# -- all of it ---------------------------------------------------------------------

# What the eBPF witness needs; nothing else in the agent does.
WITNESS_CHECKS: tuple[Callable[[], Check], ...] = (
    check_bpf_syscall, check_btf, check_tracefs, check_bcc_headers)


def kernel_checks(cfg: Config | None) -> list[Check]:
    witness = cfg.witness if cfg else WitnessConfig()
    checks = []
    for fn in WITNESS_CHECKS:
        name = fn.__name__.removeprefix("check_").removesuffix("_headers")
        checks.append(safely(name, fn) if witness.enabled
                      else passed(name, "skipped: witness.enabled is false"))
    checks.append(safely("cgroup2", check_cgroup2, witness.enabled and witness.guard))
    checks.append(safely("nftables", check_nftables))
    return checks


def safely(name: str, fn: Callable[..., Check], *args: object) -> Check:
    """A check that crashes is a failed check, not a crashed doctor."""
    try:
        return fn(*args)
    except Exception as e:  # noqa: BLE001 - every failure must become a line
        return failed(name, f"{type(e).__name__}: {e}", "report this as a tollgate bug")


def run_checks(config_path: str | None = None) -> list[Check]:
    cfg_check, cfg = load_config(config_path)
    checks = [cfg_check, *kernel_checks(cfg)]
    subjects = check_subjects(list(cfg.subjects) if cfg else raw_subjects(config_path))
    checks.append(subjects)
    fallback = Config()  # paths of the defaults when the file does not load
    checks.append(safely("store", check_store, (cfg or fallback).store.path))
    checks.append(safely("seal_key", check_seal_key, (cfg or fallback).store.key_path))
    # The ruleset is rendered from the subjects' uids: without them it cannot be.
    if cfg is None or not subjects.ok:
        checks.append(failed("ruleset", "not checked: the config or its subjects are not valid",
                             "fix the config first"))
    else:
        checks.append(safely("ruleset", check_ruleset, cfg))
    checks.append(safely("ship", check_ship, cfg or fallback))
    checks.append(safely("clock", check_clock))
    return checks


def format_line(c: Check, width: int = 11) -> str:
    line = f"{'ok' if c.ok else 'FAIL':4}  {c.name:{width}}  {c.detail}"
    return line if c.ok else f"{line}  -> fix: {c.fix}"
