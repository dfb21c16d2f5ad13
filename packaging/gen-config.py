"""Write the default /etc/tollgate/tollgate.toml from agent/config.py.

Every key appears commented out with its default and what it does, so the
file documents itself and an untouched file means built-in defaults. A key
without a description here fails the build: a new config key cannot ship
undocumented.

Usage: python3 packaging/gen-config.py > tollgate.toml
"""

from __future__ import annotations

import json
import sys
from dataclasses import MISSING, fields, is_dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from agent.config import Config  # noqa: E402

DOCS = {
    "subjects": "Unix users (names or uids) whose outbound TCP is forced through the\n"
                "recording proxy. A name must resolve on this host; a uid is taken as\n"
                "it is: list by uid a user that only a network directory knows, so\n"
                "the rules loaded before the network confine it too. Not root: the\n"
                "agent runs as root, and its own connections must not be redirected.",
    "run_dir": "Directory of the control socket (root only). The unit creates /run/tollgate.",
    "log_level": "Log level of the lines on stderr (the journal): debug, info, warning, error.",
    "proxy.port": "Local port the nftables rules redirect the subjects' TCP to.",
    "proxy.listen": "Addresses the proxy listens on; the rules redirect to loopback.",
    "proxy.buffer_bytes": "Per-direction relay chunk and buffer per session, in bytes: the most\n"
                          "one direction holds while its peer is slow to read. At most 8 MiB\n"
                          "(8388608): each read is one record in the store.",
    "proxy.connect_timeout_s": "Seconds to wait for the real destination to accept.",
    "proxy.stop_grace_s": "Stopping (a restart, an upgrade), seconds the sessions in flight get\n"
                          "to end on their own (a request gets its answer) before the rest are\n"
                          "reset, recorded with the reason. New connections wait in the\n"
                          "backlog meanwhile. 0 to 20 (the unit's TimeoutStopSec is 30).",
    "proxy.deny": "Destinations the subjects may never reach (refused and alerted).\n"
                  "The default keeps the metadata server and its token away from them.",
    "proxy.allow": "If not empty, the only destinations the subjects may reach.",
    "proxy.event_loop": "\"uvloop\" (default; less CPU per connection and per hop) or\n"
                        "\"asyncio\" (the standard library's loop).",
    "proxy.data_plane": "Who relays established sessions: \"native\" threads (C, no GIL; far less\n"
                        "CPU per byte and per hop), \"python\" (the asyncio relay), or \"auto\"\n"
                        "(default): native, unless store.durability is \"fsync\", which only the\n"
                        "asyncio relay does.",
    "proxy.relay_threads": "Native relay threads; 0 (default) is one per CPU, at most 4.",
    "dns.enabled": "Record the subjects' DNS (UDP 53 is redirected to a recording resolver).",
    "dns.port": "Local port of the recording DNS relay.",
    "dns.resolver": "Upstream resolver address; empty means the first nameserver of\n"
                    "/etc/resolv.conf.",
    "store.path": "The append-only store. Outside /var/lib/tollgate, add the directory to\n"
                  "ReadWritePaths= with `systemctl edit tollgate`.",
    "store.durability": "\"write\": a byte is forwarded once it is in the page cache;\n"
                        "\"fsync\": only once its batch is on disk (group commit).",
    "store.payload_hash": "How each record's payload is hashed into the chain: \"blake3\"\n"
                          "(default) or \"sha256\", for sites that may use only FIPS-approved\n"
                          "hashes (about five times the CPU per recorded byte).",
    "store.fsync_interval_ms": "Group-commit window when durability = \"fsync\".",
    "store.segment_max_bytes": "A segment is finished (and made immutable) at this size...",
    "store.segment_max_age_s": "...or at this age, whichever comes first.",
    "store.seal_interval_s": "Seconds between sealed checkpoints (forward-secure MACs)...",
    "store.seal_interval_bytes": "...or bytes between them, whichever comes first. Each seal's\n"
                                 "key leaves memory at once; the key file (which needs an fsync\n"
                                 "of the store first) follows at most once per seal_interval_s.",
    "store.key_path": "The sealing key file (created by `tollgate keys init` at install).",
    "store.retention_days": "`tollgate gc` deletes shipped segments older than this; 0 keeps all.",
    "witness.enabled": "Watch the kernel with eBPF and alert on connections that went\n"
                       "around the proxy (needs BCC and the running kernel's headers).",
    "witness.guard": "Refuse raw and packet sockets to the subjects in the kernel (cgroup hook).",
    "witness.match_window_ms": "How long a kernel-seen connection may wait for the proxy's\n"
                               "session before it is a bypass alert.",
    "witness.sweep_interval_s": "Seconds between sweeps of the subjects' open sockets.",
    "witness.perf_pages": "Ring buffer size in pages (rounded up to a power of two); a full\n"
                          "buffer loses events (each loss is an events_lost alert).",
    "witness.all_tcp_states": "Report every TCP state change, not only connect/established/close\n"
                              "(costly: every connection, proxied ones too, then reaches\n"
                              "user space; for investigations).",
    "enforce.table": "Name of tollgate's nftables table (family inet). Purge deletes\n"
                     "`inet tollgate` only: remove a renamed table with `tollgate rules remove`.",
    "enforce.watch_interval_s": "The kernel's notice of any nftables change makes the agent\n"
                                "check its table at once (a change is a rules_tampered alert,\n"
                                "then restored); without one, it checks every this many seconds.",
    "ship.enabled": "Copy the store to Google Cloud Logging.",
    "ship.project_id": "Google Cloud project that receives the logs.",
    "ship.log_name": "Log name of session records.",
    "ship.alert_log_name": "Log name of alerts.",
    "ship.seal_log_name": "Log name of seals.",
    "ship.credentials": "Service-account key file (root only, 0600); empty means Application\n"
                        "Default Credentials (the VM's service account on Google Cloud).",
    "ship.endpoint": "host:port override of logging.googleapis.com:443 (private endpoints).",
    "ship.instance_id": "Instance id on the entries' resource; empty: from the metadata server.",
    "ship.zone": "Zone put on the entries' resource; empty: from the metadata server.",
    "ship.batch_entries": "Entries per write request (at most 1000).",
    "ship.max_backlog_age_s": "A ship_backlog alert is raised when the oldest unshipped\n"
                              "record is older than this.",
    "ship.insecure": "Plaintext, no credentials, loopback endpoint only: for test servers.",
    "ship.state_dir": "Shipping cursors and quarantined entries (not inside the store).",
    "ship.batch_bytes": "Bytes per write request (Cloud Logging takes at most 10 MB).",
    "ship.rpc_timeout_s": "Seconds before a write request times out.",
    "ship.retry_initial_s": "First retry delay after a transient error...",
    "ship.retry_max_s": "...doubling up to this.",
    "ship.poll_interval_s": "Seconds between looks at the store for new records.",
}


def toml_value(v: object) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)  # JSON string escapes are valid TOML basic strings
    if isinstance(v, tuple):
        return "[" + ", ".join(toml_value(x) for x in v) + "]"
    raise TypeError(f"no TOML form for {v!r}")


def default(f) -> object:
    return f.default_factory() if f.default is MISSING else f.default


def section(obj: object, prefix: str) -> list[str]:
    lines: list[str] = []
    tables = []
    for f in fields(obj):
        if f.metadata.get("internal"):
            continue
        value = default(f)
        if is_dataclass(value):
            tables.append((f.name, value))
            continue
        key = prefix + f.name
        if key not in DOCS:
            raise SystemExit(f"gen-config: {key} has no description in packaging/gen-config.py")
        lines += [f"# {line}".rstrip() for line in DOCS[key].splitlines()]
        lines += [f"# {f.name} = {toml_value(value)}", ""]
    for name, value in tables:
        lines += [f"# [{name}]", ""] + section(value, f"{name}.")
    return lines


# No version in the text: a conffile whose shipped text is unchanged is kept
# silently on upgrade; any change makes dpkg ask the operator.
HEADER = """\
# tollgate: the agent's one configuration file.
#
# Every key is shown commented out with its built-in default. To change one,
# uncomment it (and, for keys below a [section] line, uncomment that line too),
# then check with `tollgate doctor` and restart: `systemctl restart tollgate`.
# This file is root's alone (mode 0600): the subjects must not read it.
"""


def main() -> None:
    body = section(Config(), "")
    sys.stdout.write(HEADER + "\n" + "\n".join(body).rstrip() + "\n")


if __name__ == "__main__":
    main()
