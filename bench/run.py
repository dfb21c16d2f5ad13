"""Runs every measurement in a throwaway sandbox and prints the table.

Order: baselines first (direct, socat, haproxy: no nftables rules yet, the
subject's client dials them), then one agent per tollgate variant (the
subject dials the corp server and nftables redirects it into the proxy),
then the rounds (the ping-pong and the connection rate through every path
in turn, each agent up only for its own turn, four times; then the
ping-pong again with the guest's halt polling on, where the host has it
off), then the witness and the store/verify/shipper figures. Nothing is
retried; only the ping-pong and the connection rate are split into rounds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil

from agent.demo.sandbox import BASTION_V4, CORP_V4, Sandbox, wait_for, which
from bench.table import POLLING, Results, ratio, render

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SERVER_PORT, SOCAT_PORT, HAPROXY_PORT, AGENT_PORT = 9000, 8001, 8002, 15001
# haproxy's second listener, on loopback: where the agent's ruleset, loaded
# with no agent running, redirects the subject's dials (BEHIND_REDIRECT).
HAPROXY_REDIRECTED_PORT = 8003
APT = {"socat": "socat", "haproxy": "haproxy", "gcc": "gcc"}


@dataclass(frozen=True)
class Scale:
    bulk_bytes: int      # each way, split across the connections of a run
    trips: int           # ping-pong round trips
    rate_s: float        # connection-rate duration
    idle: int            # concurrent idle sessions for the memory figure
    bypass_tries: int
    store_mib: int
    variants: tuple[str, ...]


# How tollgate is run for each column: durability, and the [proxy] lines.
# "fsync" gets the asyncio relay ("auto"), the only one that waits for group commit.
VARIANTS = {
    "native": ("write", 'data_plane = "native"\n'),
    "uvloop": ("write", 'data_plane = "python"\nevent_loop = "uvloop"\n'),
    "asyncio": ("write", 'data_plane = "python"\nevent_loop = "asyncio"\n'),
    "fsync": ("fsync", 'event_loop = "uvloop"\n'),
}
COLUMN = {"native": "tollgate write (native)", "uvloop": "tollgate write (asyncio relay, uvloop)",
          "asyncio": "tollgate write (asyncio relay, asyncio)", "fsync": "tollgate fsync"}


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Scale]:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run (< 1 min)")
    p.add_argument("--bulk-mib", type=int, help="MiB each way per bulk run (default 1024)")
    p.add_argument("--trips", type=int, help="ping-pong round trips (default 20000)")
    p.add_argument("--rate-seconds", type=float, help="connection-rate duration (default 10)")
    p.add_argument("--idle", type=int, help="idle sessions for the memory figure (default 1000)")
    p.add_argument("--bypass-tries", type=int, help="bypass detection tries (default 200)")
    p.add_argument("--store-mib", type=int, help="MiB appended for the store figures (default 1024)")
    p.add_argument("--variants", default=None,
                   help="comma-separated tollgate columns: native (the default data plane),"
                        " uvloop and asyncio (the asyncio relay, data_plane = python, on each"
                        " loop), fsync (durability fsync); default native,uvloop,fsync,"
                        " native alone in --quick")
    p.add_argument("--json", type=Path, help="also write the raw figures here")
    a = p.parse_args(argv)
    q = a.quick
    variants = tuple((a.variants or ("native" if q else "native,uvloop,fsync")).split(","))
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        p.error(f"--variants: unknown {', '.join(sorted(unknown))}; one of {', '.join(VARIANTS)}")
    scale = Scale(
        bulk_bytes=(a.bulk_mib or (8 if q else 1024)) << 20,
        trips=a.trips or (500 if q else 20_000),
        rate_s=a.rate_seconds or (1.0 if q else 10.0),
        idle=a.idle or (50 if q else 1000),
        bypass_tries=a.bypass_tries or (5 if q else 200),
        store_mib=a.store_mib or (8 if q else 1024),
        variants=variants)
    return a, scale


# -- setup -------------------------------------------------------------------------


def install() -> None:
    """What the bench needs beyond `make setup`: the apt tools, if missing."""
    missing = [pkg for tool, pkg in APT.items() if shutil.which(tool) is None
               and shutil.which(tool, path="/usr/sbin") is None]
    if missing:
        print(f"bench: installing {' '.join(missing)}", file=sys.stderr)
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
                       check=True, env=env)


def compile_loadgen(work: Path) -> str:
    out = work / "loadgen"
    subprocess.run(["gcc", "-O2", "-pthread", "-o", str(out), str(HERE / "loadgen.c")],
                   check=True)
    return str(out)


def machine() -> dict:
    cpu = next((line.split(":", 1)[1].strip() for line in
                Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(),
            "python": platform.python_version()}


# -- the agent under test -------------------------------------------------------------


class Agent:
    """The real daemon in the bastion namespace, run as one of VARIANTS."""

    def __init__(self, sb: Sandbox, work: Path, *, variant: str, witness: bool,
                 port: int = AGENT_PORT) -> None:
        durability, proxy = VARIANTS[variant]
        self.sb, self.work = sb, work
        work.mkdir(parents=True)
        self.store = work / "store"
        self.config = work / "tollgate.toml"
        self.config.write_text(
            f'subjects = ["{sb.subject}"]\nrun_dir = "{work}/run"\nlog_level = "info"\n'
            f'[proxy]\nport = {port}\n{proxy}'
            f'[store]\npath = "{self.store}"\nkey_path = "{work}/keys/seal.key"\n'
            f'durability = "{durability}"\n'
            f'[dns]\nenabled = false\n'
            f'[witness]\nenabled = {"true" if witness else "false"}\n')
        self.log = work / "agent.log"
        self.proc: subprocess.Popen | None = None

    def cli(self, *args: str) -> list[str]:
        """`tollgate --config <this agent's> ARGS` as an argv."""
        return [sys.executable, "-m", "agent.cli", "--config", str(self.config), *args]

    def start(self, timeout: float = 60) -> "Agent":
        # As the deb's postinst leaves it: a sealing key, so the store is sealed.
        subprocess.run(self.cli("keys", "init"), check=True, capture_output=True)
        notify = self.work / "notify.sock"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
            s.bind(str(notify))
            s.settimeout(timeout)
            env = {**os.environ, "NOTIFY_SOCKET": str(notify), "PYTHONPATH": str(ROOT)}
            self.proc = self.sb.spawn(self.sb.bastion, self.cli("run"), env=env,
                                      stderr=open(self.log, "ab"))
            try:
                for _ in range(1000):
                    if b"READY=1" in s.recv(4096):
                        break
            except socket.timeout:
                self.stop()
                raise RuntimeError(f"agent did not become ready:\n{self.log.read_text()[-3000:]}")
        return self

    def rss_mib(self) -> float:
        p = psutil.Process(self.proc.pid)
        return sum(x.memory_info().rss for x in [p, *p.children(recursive=True)]) / 2**20

    def stop(self) -> None:
        """Stop the daemon and lift its rules, which would otherwise stay
        (fail closed), as an operator does: `tollgate rules remove`. Each
        measurement after starts from no rules, as the baselines did."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
        self.sb.run(self.sb.bastion, self.cli("rules", "remove", "--reason", "bench: next run"),
                    env={**os.environ, "PYTHONPATH": str(ROOT)}, check=True, capture_output=True)
        # Finished segments are immutable (WORM); the bench store must still go.
        subprocess.run(["chattr", "-R", "-i", str(self.store)], capture_output=True)
        shutil.rmtree(self.store, ignore_errors=True)


def cpu_seconds(pid: int) -> float:
    """CPU time of a process's threads and its live children, to the
    nanosecond (schedstat; the clock-tick counters cannot see a short run)."""
    total, root = 0, psutil.Process(pid)
    for proc in [root, *root.children(recursive=True)]:
        for task in Path(f"/proc/{proc.pid}/task").iterdir():
            try:
                total += int((task / "schedstat").read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass  # a thread that ended meanwhile
    return total / 1e9


def witness_wired() -> bool:
    """Does the daemon start the witness when `[witness] enabled` is set?"""
    src = (ROOT / "agent" / "daemon.py").read_text()
    return "cfg.witness" in src or "witness.enabled" in src


# -- measurements -----------------------------------------------------------------------


class Bench:
    def __init__(self, sb: Sandbox, loadgen: str, scale: Scale, as_root: bool = False) -> None:
        """The load runs as the subject (redirected once an agent runs), or
        as root (never redirected)."""
        self.sb, self.lg, self.scale = sb, loadgen, scale
        self.user = None if as_root else sb.subject

    def _client(self, *args: str, timeout: float = 600) -> dict:
        r = self.sb.run(self.sb.bastion, [self.lg, *args], user=self.user, timeout=timeout,
                        text=True)
        if r.returncode != 0 or not r.stdout.strip():
            raise RuntimeError(f"loadgen {' '.join(args)} failed ({r.returncode}): "
                               f"{r.stdout[-500:]}{r.stderr[-500:]}")
        return json.loads(r.stdout.strip().splitlines()[-1])

    def bulk(self, host: str, port: int, conns: int) -> float:
        """MB/s through the path, both directions together."""
        per = max(self.scale.bulk_bytes // conns, 1)
        r = self._client("bulk", host, str(port), str(per), str(conns))
        if r["ok"] != conns:
            raise RuntimeError(f"bulk through {host}:{port}: {r}")
        return 2 * r["bytes_each_way"] / r["seconds"] / 1e6

    def pingpong(self, host: str, port: int, trips: int | None = None) -> dict:
        """{"n", "p50_us", "p99_us", "rtt_us": every trip's, sorted}."""
        return self._client("pingpong", host, str(port), str(trips or self.scale.trips), "all")

    def connrate(self, host: str, port: int, seconds: float | None = None) -> dict:
        """{"per_s", "done", "failed", "seconds"} of short connections."""
        seconds = seconds or self.scale.rate_s
        return self._client("connrate", host, str(port), str(seconds), "8",
                            timeout=seconds + 120)

    def idle_rss(self, agent: Agent, host: str, port: int) -> dict:
        n = self.scale.idle
        before = agent.rss_mib()
        p = self.sb.spawn(self.sb.bastion, [self.lg, "idle", host, str(port), str(n), "300"],
                          user=self.sb.subject, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        try:
            ready, _, _ = select.select([p.stdout], [], [], 240)
            if not ready:
                raise RuntimeError("idle sessions did not open within 240 s")
            line = p.stdout.readline()
            if not line:
                return {"open": 0, "rss_mib": "n/a (idle client died)", "rss_before_mib": before}
            opened = json.loads(line)["open"]
            time.sleep(1.0)  # let attribution of the last sessions finish
            rss = agent.rss_mib()
        finally:
            p.stdin.close()
            p.wait(60)
        return {"open": opened, "rss_mib": rss, "rss_before_mib": before}

    def bypass_latency(self, agent: Agent) -> dict | str:
        """Time from a bypassing connect to the witness's alert record.

        The operator removes the rules (`tollgate rules remove`, so the agent
        does not put them back); the subject then connects straight to corp
        scale.bypass_tries times, 20 ms apart, printing each connect's wall
        time and source port. Each bypass alert's store time, matched by
        source port, gives the latency. Rules are applied again after.
        """
        self.sb.run(self.sb.bastion, agent.cli("rules", "remove", "--reason", "bench"), check=True)
        try:
            r = self.sb.subject_run([sys.executable, "-c", _BYPASS_CLIENT, CORP_V4,
                                     str(SERVER_PORT), str(self.scale.bypass_tries)],
                                    text=True, timeout=120)
            sent = dict(tuple(map(int, line.split())) for line in r.stdout.split("\n") if line)
            time.sleep(1.0)  # the last window closes
            detected = _bypass_alert_times(agent.store)
        finally:
            self.sb.run(self.sb.bastion, agent.cli("rules", "apply"), check=True)
        lat = sorted((detected[p] - t) / 1e6 for p, t in sent.items() if p in detected)
        if not lat:
            return "n/a (no bypass detected)"
        return {"p50_ms": lat[len(lat) // 2], "p99_ms": lat[min(len(lat) - 1, int(len(lat) * 0.99))],
                "detected": len(lat), "tries": len(sent)}


# One connect every 20 ms; prints "<source port> <wall ns before connect>".
_BYPASS_CLIENT = """
import socket, sys, time
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
for _ in range(n):
    s = socket.socket()
    t = time.time_ns()
    s.connect((host, port))
    print(s.getsockname()[1], t, flush=True)
    s.close()
    time.sleep(0.02)
"""


def _bypass_alert_times(store: Path) -> dict[int, int]:
    """source port -> store time of its bypass alert."""
    from agent.store import Kind, iter_records
    out = {}
    for r in iter_records(store, strict=False):
        if r.kind == Kind.ALERT:
            a = r.json()
            if a.get("type") == "bypass":
                out.setdefault(int(a["evidence"].get("sport", 0)), r.ts_ns)
    return out


def _metered(pid: int | None, fn, *args):
    """(fn's result, CPU seconds the relay `pid` spent on it, None without a
    pid): the cost behind each ratio."""
    if pid is None:
        return fn(*args), None
    before = cpu_seconds(pid)
    out = fn(*args)
    return out, cpu_seconds(pid) - before


def _bulk(b: Bench, res: Results, col: str, host: str, port: int, pid: int | None) -> None:
    """Bulk (1 and 8) through one path; with the relay's pid, also the CPU
    it spent per MB."""
    # Each bulk run starts with no dirty page cache: earlier runs' GBs would
    # otherwise throttle this one's store writes to the disk's speed.
    os.sync()
    mbps, cpu = _metered(pid, b.bulk, host, port, 1)
    res.put("bulk1", col, mbps)
    if cpu is not None:
        res.put("cpu_mb", col, cpu * 1e3 / (b.scale.bulk_bytes * 2 / 1e6))
    os.sync()
    res.put("bulk8", col, b.bulk(host, port, 8))


# The ping-pong and the connection rate go through every path in turn, this
# many times: one run a path, minutes apart, moved with the host by more
# than the gaps measured (direct's ping-pong 54-68 us within a minute;
# tollgate's connection rate 1,161 and 3,869 conn/s four minutes apart).
LATENCY_ROUNDS = 4
# A ping-pong at once after an agent is ready ran slower than one 3 s later
# (p50 81-95 against 77-79 us, four starts): the host is still busy with
# the start (BCC's compile). An agent in service has long been up.
SETTLE_S = 3.0
UNDER_RULES = "haproxy, agent's ruleset loaded"
BEHIND_REDIRECT = "haproxy, behind the agent's redirect"
# haproxy timed again on part of tollgate's path, each in a note that splits
# tollgate's added latency into what that path costs any relay and what
# tollgate adds to it. The baseline column has neither: no rules, no NAT.
BESIDE = {
    UNDER_RULES: "haproxy with the agent's ruleset loaded (conntrack on, not redirected)",
    BEHIND_REDIRECT: "haproxy behind the agent's redirect (the subject's dial redirected to "
                     "it as to tollgate, nothing recorded)",
}


class _Trips:
    """Round trips pooled per path over the latency rounds, and the CPU its
    relay spent on them."""

    def __init__(self) -> None:
        self.rtt: dict[str, list[float]] = {}
        self.cpu: dict[str, float] = {}

    def run(self, col: str, b: Bench, host: str, port: int, trips: int, pid: int | None) -> None:
        pp, cpu = _metered(pid, b.pingpong, host, port, trips)
        self.rtt.setdefault(col, []).extend(pp["rtt_us"])
        if cpu is not None:
            self.cpu[col] = self.cpu.get(col, 0.0) + cpu

    def cpu_per_trip(self, col: str) -> float | None:
        """us of the relay's CPU a round trip, None for a path without a pid."""
        return self.cpu[col] * 1e6 / len(self.rtt[col]) if col in self.cpu else None

    def percentile(self, col: str, q: float) -> float:
        s = sorted(self.rtt[col])
        return s[int(len(s) * q)]   # as loadgen: p50 = s[n/2], p99 = s[n*0.99]


class _Conns:
    """Short connections pooled per path over the rounds, and the CPU its
    relay spent on them."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}
        self.failed: dict[str, int] = {}
        self.seconds: dict[str, float] = {}
        self.cpu: dict[str, float] = {}

    def run(self, col: str, b: Bench, host: str, port: int, seconds: float,
            pid: int | None) -> None:
        # Not while earlier runs' GBs are written back: only a recording
        # relay leaves any behind.
        os.sync()
        got, cpu = _metered(pid, b.connrate, host, port, seconds)
        self.done[col] = self.done.get(col, 0) + got["done"]
        self.failed[col] = self.failed.get(col, 0) + got["failed"]
        self.seconds[col] = self.seconds.get(col, 0.0) + got["seconds"]
        if cpu is not None:
            self.cpu[col] = self.cpu.get(col, 0.0) + cpu

    def put(self, res: Results) -> None:
        """Rows rate (all connections over all their seconds) and cpu_conn;
        a note for a path where connections failed (not in its rate)."""
        for col, done in self.done.items():
            res.put("rate", col, done / self.seconds[col])
            if col in self.cpu and done:
                res.put("cpu_conn", col, self.cpu[col] * 1e6 / done)
            if self.failed[col]:
                res.note(f"connection rate: {self.failed[col]:,} of "
                         f"{done + self.failed[col]:,} connections through {col} failed")


def _rounds(sb: Sandbox, work: Path, b: Bench, root: Bench, res: Results,
            relays: dict[str, int], paths: dict[str, tuple[str, int]]) -> None:
    """The ping-pong and the connection rate through every path in
    LATENCY_ROUNDS interleaved rounds (each agent started for its turn and
    stopped after): p50 and p99 over all of a path's trips, the rate over
    all its connections (rate_s in all, a slice a round). haproxy also runs
    the ping-pong while the native agent's ruleset is loaded (dialed by
    root, not redirected), for the note on what the redirect's conntrack
    costs any relay, and once more behind that ruleset's redirect with no
    agent running (the subject's dial redirected to haproxy): what the
    redirect's NAT adds. Then the ping-pong again with the guest's halt
    polling on, where this host has it off (see guest_halt_polling)."""
    conns = _Conns()
    t = _one_pass(sb, work, b, root, relays, paths, "rtt", conns)
    conns.put(res)
    for col in t.cpu:
        res.put("cpu_rtt", col, t.cpu_per_trip(col))
    _put_latency(res, t, "")
    with guest_halt_polling(HALT_POLL_NS) as polling:
        if polling:
            _step(f"latency again, guest halt polling {HALT_POLL_NS // 1000} us")
            _put_latency(res, _one_pass(sb, work, b, root, relays, paths, "rtt-poll"),
                         POLLING)


def _one_pass(sb: Sandbox, work: Path, b: Bench, root: Bench, relays: dict[str, int],
              paths: dict[str, tuple[str, int]], name: str,
              conns: _Conns | None = None) -> _Trips:
    """One pass of the rounds; the connection rate too, given conns."""
    rounds = min(LATENCY_ROUNDS, b.scale.trips)
    per = max(b.scale.trips // rounds, 1)
    slice_s = b.scale.rate_s / rounds
    settle = SETTLE_S if per >= 1000 else 0.0   # --quick has no time for it
    t = _Trips()
    for i in range(rounds):
        os.sync()
        for path, (host, port) in paths.items():
            t.run(path, b, host, port, per, relays.get(path))
        # After every ping-pong: a burst of connections leaves the host busy
        # closing them for a moment.
        for path, (host, port) in paths.items() if conns is not None else ():
            conns.run(path, b, host, port, slice_s, relays.get(path))
        for variant in b.scale.variants:
            if VARIANTS[variant][0] != "write":
                continue
            agent = Agent(sb, work / f"agent-{name}-{variant}-{i}", variant=variant,
                          witness=True).start()
            try:
                time.sleep(settle)
                t.run(COLUMN[variant], b, *paths["direct"], per, agent.proc.pid)
                if variant == "native":
                    t.run(UNDER_RULES, root, *paths["haproxy"], per, relays.get("haproxy"))
                if conns is not None:
                    conns.run(COLUMN[variant], b, *paths["direct"], slice_s, agent.proc.pid)
            finally:
                agent.stop()
        with redirected(sb, work / f"redirect-{name}-{i}"):
            t.run(BEHIND_REDIRECT, b, *paths["direct"], per, relays.get("haproxy"))
    return t


@contextlib.contextmanager
def redirected(sb: Sandbox, work: Path) -> Iterator[None]:
    """The agent's ruleset, loaded by its own command with no agent running
    and its redirect pointed at haproxy's loopback listener: the subject's
    dials then take tollgate's kernel path (conntrack, NAT on the way in)
    to a relay that records nothing."""
    rules = Agent(sb, work, variant="native", witness=False, port=HAPROXY_REDIRECTED_PORT)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = sb.run(sb.bastion, rules.cli("rules", "apply", "--reason", "bench: haproxy behind it"),
               env=env, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"tollgate rules apply failed: {r.stderr.strip()[-2000:]}")
    try:
        yield
    finally:
        rules.stop()


def _put_latency(res: Results, t: _Trips, polling: str) -> None:
    """p50 and p99 of each path (rows rtt_p50/rtt_p99, + POLLING for the
    halt-polling rounds), and a note for each of haproxy's runs on part of
    tollgate's path (BESIDE)."""
    for col in t.rtt:
        if col not in BESIDE:
            res.put("rtt_p50" + polling, col, t.percentile(col, 0.5))
            res.put("rtt_p99" + polling, col, t.percentile(col, 0.99))
    for col, what in BESIDE.items():
        if col in t.rtt:
            res.note((f"guest halt polling {HALT_POLL_NS // 1000} us: " if polling else "")
                     + what + ": " + _added_beside(res, t, col, polling) + _cpu_beside(t, col))


def _cpu_beside(t: _Trips, col: str) -> str:
    """haproxy's CPU a round trip on that path, beside its own on the
    baseline path and tollgate's: how much of tollgate's extra CPU the path
    costs any relay (the softirq work of a send is charged to the sender)."""
    mine = t.cpu_per_trip(col)
    if mine is None:
        return ""
    others = [f"{c} {v:.1f}" for c in ("haproxy", COLUMN["native"])
              if (v := t.cpu_per_trip(c)) is not None]
    return f"; CPU a round trip {mine:.1f} us (" + ", ".join(others) + ")"


# This host's kernel is booted with the guest's halt polling off
# (haltpoll.guest_halt_poll_ns=0): an idle vCPU halts at once, and waking it
# goes through the hypervisor. That wake is most of a round trip here
# (direct ping-pong p50 70-90 us; 15-18 us with halt polling or with any
# busy process keeping a vCPU awake), and each relay adds wakes, so the
# latency rows are measured a second time with KVM's default halt polling
# (200 us), the same for every path, and the knob put back.
HALT_POLL = Path("/sys/module/haltpoll/parameters/guest_halt_poll_ns")
HALT_POLL_NS = 200_000


@contextlib.contextmanager
def guest_halt_polling(ns: int) -> Iterator[bool]:
    """Turn the guest's halt polling on for the block, if it is off here;
    yields whether it did (False: no such knob, or it polls already, and
    the plain rows are already measured so)."""
    try:
        old = HALT_POLL.read_text().strip()
    except OSError:
        old = None
    if old != "0":
        yield False
        return
    HALT_POLL.write_text(str(ns))
    try:
        yield True
    finally:
        HALT_POLL.write_text(old)


def _added_beside(res: Results, t: _Trips, col: str, polling: str = "") -> str:
    """haproxy's p50 and p99 on part of tollgate's path, each with what it
    adds over direct and tollgate's added latency as a multiple of that."""
    parts = []
    for q, key, at in (("p50", "rtt_p50", 0.5), ("p99", "rtt_p99", 0.99)):
        mine = t.percentile(col, at)
        fig = res.figures.get(key + polling, {})
        direct, tollgate = fig.get("direct"), fig.get(COLUMN["native"])
        part = f"{q} {mine:.1f} us"
        if isinstance(direct, (int, float)) and isinstance(tollgate, (int, float)):
            r = ratio(tollgate - direct, mine - direct) if mine > direct else None
            part += (f" ({mine - direct:+.1f} over direct; tollgate's added: "
                     + (f"{r:.2f}x this)" if r is not None else "n/a)"))
        parts.append(part)
    return ", ".join(parts)


def run_all(sb: Sandbox, work: Path, lg: str, scale: Scale, res: Results,
            relays: dict[str, int]) -> None:
    b = Bench(sb, lg, scale)
    root = Bench(sb, lg, scale, as_root=True)  # not redirected: the notes' comparisons
    srv = (CORP_V4, SERVER_PORT)
    paths = {"direct": srv, "socat": (BASTION_V4, SOCAT_PORT),
             "haproxy": (BASTION_V4, HAPROXY_PORT)}
    for name, (host, port) in paths.items():
        _step(f"{name}: bulk")
        _bulk(b, res, name, host, port, relays.get(name))

    for variant in scale.variants:
        col = COLUMN[variant]
        write = VARIANTS[variant][0] == "write"
        _step(f"{col}: start agent")
        # As shipped: the witness on (it also names each connection's process).
        agent = Agent(sb, work / f"agent-{variant}", variant=variant, witness=True).start()
        try:
            _bulk(b, res, col, *srv, agent.proc.pid)
            if write:
                m = b.idle_rss(agent, *srv)
                res.put("rss", col, m["rss_mib"])
                res.note(f"{col}: {m['open']} of {scale.idle} idle sessions open; "
                         f"RSS {m['rss_before_mib']:.1f} MiB before them")
        finally:
            agent.stop()

    _step(f"ping-pong and connection rate, {LATENCY_ROUNDS} rounds through every path in turn")
    _rounds(sb, work, b, root, res, relays, paths)

    variant = next((v for v in scale.variants if VARIANTS[v][0] == "write"), "native")
    if witness_wired():
        rates, others = {}, {}
        for on in (False, True):
            _step(f"witness {'on' if on else 'off'}: connection rate")
            agent = Agent(sb, work / f"agent-witness-{on}", variant=variant, witness=on).start()
            try:
                rates[on] = b.connrate(*srv)["per_s"]
                others[on] = root.connrate(*srv)["per_s"]
                if on:
                    res.put("bypass", "tollgate", b.bypass_latency(agent))
            finally:
                agent.stop()
        res.put("witness", "off", rates[False])
        res.put("witness", "on", rates[True])
        # "off" names processes through /proc, so the row's ratio says little
        # about the probes' own cost; this says what they cost everyone else.
        res.note(f"witness cost to traffic it does not proxy (root's direct connections "
                 f"while the agent runs): {others[True]:,.0f} conn/s with the witness, "
                 f"{others[False]:,.0f} without: {others[True] / others[False]:.2f}")
    else:
        res.put("witness", "on", "n/a (witness not wired)")
        res.put("bypass", "tollgate", "n/a (witness not wired)")

    _step("store append, verify, shipper")
    r = sb.run(sb.bastion, [sys.executable, "-m", "bench.storebench", str(scale.store_mib),
                            str(work / "storebench")], timeout=900, text=True, cwd=str(ROOT))
    if r.returncode != 0:
        raise RuntimeError(f"storebench failed: {r.stderr[-2000:]}")
    for k, v in json.loads(r.stdout.strip().splitlines()[-1]).items():
        res.put(k, "tollgate", v)


def _step(what: str) -> None:
    print(f"bench: {what}", file=sys.stderr, flush=True)


def start_relays(sb: Sandbox, work: Path, lg: str) -> dict[str, int]:
    """The server, then socat and haproxy; returns haproxy's pid (its CPU is
    measured like the agent's; socat's forked children are gone too soon)."""
    sb.spawn(sb.corp, [lg, "serve", str(SERVER_PORT)])
    # socat as it is usually run: one forked child per connection, default buffer.
    sb.spawn(sb.bastion, [which("socat"), f"TCP-LISTEN:{SOCAT_PORT},bind={BASTION_V4},fork,"
                          "reuseaddr,backlog=4096", f"TCP:{CORP_V4}:{SERVER_PORT}"])
    cfg = work / "haproxy.cfg"
    cfg.write_text(
        "global\n  maxconn 8000\n"
        "defaults\n  mode tcp\n  timeout connect 10s\n  timeout client 300s\n"
        "  timeout server 300s\n"
        f"listen relay\n  bind {BASTION_V4}:{HAPROXY_PORT}\n"
        f"  server corp {CORP_V4}:{SERVER_PORT}\n"
        f"listen redirected\n  bind 127.0.0.1:{HAPROXY_REDIRECTED_PORT}\n"
        f"  server corp {CORP_V4}:{SERVER_PORT}\n")
    haproxy = sb.spawn(sb.bastion, [which("haproxy"), "-db", "-f", str(cfg)])
    for ns, host, port in ((sb.corp, CORP_V4, SERVER_PORT), (sb.bastion, BASTION_V4, SOCAT_PORT),
                           (sb.bastion, BASTION_V4, HAPROXY_PORT),
                           (sb.bastion, "127.0.0.1", HAPROXY_REDIRECTED_PORT)):
        wait_for(lambda: _port_open(sb, ns, host, port), 15, what=f"{host}:{port}")
    return {"haproxy": haproxy.pid}


def _port_open(sb: Sandbox, ns: str, host: str, port: int) -> bool:
    code = (f"import socket; socket.create_connection(('{host}', {port}), 1).close()")
    return sb.run(ns, [sys.executable, "-c", code], timeout=10).returncode == 0


def tune_namespaces(sb: Sandbox) -> None:
    """Short connections by the ten thousand need ports: reuse TIME_WAIT ones."""
    for ns in (sb.bastion, sb.corp):
        sb.run(ns, ["sysctl", "-q", "-w", "net.ipv4.ip_local_port_range=1024 65000",
                    "net.ipv4.tcp_tw_reuse=1", "net.core.somaxconn=4096"], check=True)


def raise_fd_limit() -> None:
    """The agent holds two sockets per session; it inherits this limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 65536)), hard))


@contextlib.contextmanager
def workdir(prefix: str) -> Iterator[Path]:
    """A scratch directory the subject can run the load generator from,
    removed after (with its immutable store segments)."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(work, 0o755)
    try:
        yield work
    finally:
        subprocess.run(["chattr", "-R", "-i", str(work)], capture_output=True)
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    args, scale = parse(argv)
    if os.geteuid() != 0:
        print("bench: needs root (network namespaces, nftables)", file=sys.stderr)
        return 2
    install()
    raise_fd_limit()
    res = Results(machine=machine(), command="python -m bench " + " ".join(
        sys.argv[1:] if argv is None else argv), scale=scale.__dict__)
    t0 = time.monotonic()
    with workdir("tgb-") as work:
        lg = compile_loadgen(work)
        with Sandbox(prefix="tgb", subject="tgbench") as sb:
            tune_namespaces(sb)
            relays = start_relays(sb, work, lg)
            run_all(sb, work, lg, scale, res, relays)
    res.seconds = time.monotonic() - t0
    print(render(res))
    if args.json:
        args.json.write_text(json.dumps(res.to_json(), indent=1))
    return 0
