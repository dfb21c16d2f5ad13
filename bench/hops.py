"""Where a relayed round trip's time goes: the syscalls of haproxy and of
tollgate (native plane, witness on) under the bench's 1-byte ping-pong,
timed in the kernel (BPF, bench/syscall_time.c).

    python -m bench.hops [--trips 200000] [--seconds 5]

For each relay it prints the round trips' p50 and, per syscall, how many
calls a round trip made and how long each took. The difference between the
two is what tollgate's per-hop work costs (the redirect's NAT on each send;
the record is copied into the mapped segment, no syscall, since the twelfth
session: before, a writev a hop); the rest of a round trip is the same kernel
TCP path and wake-ups for both. A third line times haproxy again while the
agent runs, its load run by root (not redirected): what the agent's mere
presence (its nftables NAT, hence conntrack on every packet, and its BPF)
costs traffic it does not relay.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

from bcc import BPF

from bench.run import (BASTION_V4, CORP_V4, HAPROXY_PORT, SERVER_PORT, Agent, Bench, Sandbox,
                       Scale, compile_loadgen, install, raise_fd_limit, start_relays,
                       tune_namespaces, workdir)

HERE = Path(__file__).resolve().parent
SYSCALLS = ("recvfrom", "sendto", "writev", "pwritev", "pwrite64", "epoll_wait", "read", "write")


def _program(tgid: int) -> str:
    probes = "".join(
        f"TRACEPOINT_PROBE(syscalls, sys_enter_{name}) {{ return tg_enter(); }}\n"
        f"TRACEPOINT_PROBE(syscalls, sys_exit_{name}) {{ return tg_exit({slot}); }}\n"
        for slot, name in enumerate(SYSCALLS))
    return ((HERE / "syscall_time.c").read_text().replace("PROBES", probes)
            .replace("NSYSCALLS", str(len(SYSCALLS))).replace("TGID", str(tgid)))


class SyscallTimer:
    """The syscalls of one process, timed in the kernel from clear() to read()."""

    def __init__(self, pid: int) -> None:
        self._bpf = BPF(text=_program(pid))   # compiling takes a second: before the run

    def clear(self) -> None:
        self._bpf["total_ns"].clear()
        self._bpf["calls"].clear()

    def read(self) -> dict[str, tuple[int, float]]:
        """{syscall: (calls, mean microseconds)} since clear()."""
        total, calls = self._bpf["total_ns"], self._bpf["calls"]
        return {name: (calls[slot].value, total[slot].value / calls[slot].value / 1e3)
                for slot, name in enumerate(SYSCALLS) if calls[slot].value}

    def close(self) -> None:
        self._bpf.cleanup()


def measure(b: Bench, host: str, port: int, pid: int, seconds: float) -> dict:
    """Ping-pong through (host, port) with pid's syscalls timed for `seconds`
    in the middle of it; per round trip figures."""
    timer = SyscallTimer(pid)
    try:
        out: dict = {}
        run = threading.Thread(target=lambda: out.update(pp=b.pingpong(host, port)))
        run.start()
        time.sleep(0.5)   # past the connect and the first trips
        timer.clear()
        started = time.monotonic()
        time.sleep(seconds)
        calls, elapsed = timer.read(), time.monotonic() - started
        run.join()
    finally:
        timer.close()
    pp = out["pp"]
    # Both relays send once each way per round trip, whatever else they do.
    trips = max(calls.get("sendto", (0, 0.0))[0] / 2, 1)
    rows = {name: {"calls_per_trip": round(n / trips, 2), "us_each": round(us, 2),
                   "us_per_trip": round(n * us / trips, 2)} for name, (n, us) in calls.items()}
    return {"p50_us": pp["p50_us"], "p99_us": pp["p99_us"], "timed_s": round(elapsed, 2),
            "trips_timed": int(trips), "syscalls": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.hops", description=__doc__.split("\n")[0])
    p.add_argument("--trips", type=int, default=200_000)
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args(argv)
    install()
    raise_fd_limit()
    scale = Scale(0, args.trips, 0, 0, 0, 0, ("native",))
    with workdir("tghops-") as work:
        lg = compile_loadgen(work)
        with Sandbox(prefix="tgh", subject="tgbench") as sb:
            tune_namespaces(sb)
            relays = start_relays(sb, work, lg)
            b = Bench(sb, lg, scale)
            # haproxy before the agent: its rules would redirect the subject's dial.
            print(json.dumps({"relay": "haproxy", **measure(
                b, BASTION_V4, HAPROXY_PORT, relays["haproxy"], args.seconds)}), flush=True)
            agent = Agent(sb, work / "agent", variant="native", witness=True).start()
            try:
                print(json.dumps({"relay": "tollgate", **measure(
                    b, CORP_V4, SERVER_PORT, agent.proc.pid, args.seconds)}), flush=True)
                print(json.dumps({"relay": "haproxy, agent running", **measure(
                    Bench(sb, lg, scale, as_root=True), BASTION_V4, HAPROXY_PORT,
                    relays["haproxy"], args.seconds)}), flush=True)
            finally:
                agent.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
