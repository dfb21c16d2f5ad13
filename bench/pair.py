"""Paired runs of two checkouts, alternating, for a change smaller than the
host's swing between full runs.

    python -m bench.pair OLD_CHECKOUT NEW_CHECKOUT [--rounds 4] [--seconds 8]
    python -m bench.pair OLD_CHECKOUT NEW_CHECKOUT --latency [--trips 20000]

Each run is one agent (native plane, witness on, as the deb leaves it) from
one checkout, in a fresh sandbox with the bench's server, measured with the
bench's own load: short connections (connection rate), or with --latency
the 1-byte ping-pong after the bench's settle; the checkouts take turns.
Each checkout must be built (`setup.py build_ext --inplace`). Prints one
JSON line per run and the means: the rate (or p50/p99), the agent's CPU a
connection (or round trip), and the same split by thread (`main`: the
daemon's event loop, where the Python of each connection runs; `relay`: the
pump's threads; `other`: the witness's poll thread and the rest) with each
group's context switches: where a change moved the time, which the rate
alone cannot resolve on a noisy host.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from bench.run import workdir

# Runs with the measured checkout's own bench.run, so it uses only what older
# checkouts have too (hence the file limit raised here, not by raise_fd_limit).
_ONE = """
import json, resource, sys, time
from pathlib import Path
from bench.run import (CORP_V4, SERVER_PORT, Agent, Bench, Sandbox, Scale, _port_open,
                       compile_loadgen, cpu_seconds, tune_namespaces, wait_for)
work = Path(sys.argv[1]); seconds = float(sys.argv[2]); trips = int(sys.argv[3])
GROUPS = ("main", "relay", "other")
def by_thread(pid):   # {group: (CPU ns, context switches)} of the agent's threads now
    out = dict.fromkeys(GROUPS, (0, 0))
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            comm = (task / "comm").read_text().strip()
            ns = int((task / "schedstat").read_text().split()[0])
            sw = sum(int(line.split()[1]) for line in (task / "status").read_text().splitlines()
                     if "ctxt_switches:" in line)
        except (OSError, ValueError, IndexError):
            continue    # a thread that ended meanwhile
        group = "main" if task.name == str(pid) else "relay" if comm == "tollgate-relay" else "other"
        out[group] = (out[group][0] + ns, out[group][1] + sw)
    return out
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
lg = compile_loadgen(work)
with Sandbox(prefix="tgpair", subject="tgbench") as sb:
    tune_namespaces(sb)
    sb.spawn(sb.corp, [lg, "serve", str(SERVER_PORT)])
    wait_for(lambda: _port_open(sb, sb.corp, CORP_V4, SERVER_PORT), 15, what="the server")
    agent = Agent(sb, work / "agent", variant="native", witness=True).start()
    try:
        bench = Bench(sb, lg, Scale(0, trips, seconds, 0, 0, 0, ("native",)))
        idle0 = int(open("/proc/stat").readline().split()[4])
        cpu0, threads0 = cpu_seconds(agent.proc.pid), by_thread(agent.proc.pid)
        if trips:
            time.sleep(3.0)  # the bench's settle: BCC's compile leaves the host busy
            r = bench.pingpong(CORP_V4, SERVER_PORT)
            out = {"p50_us": r["p50_us"], "p99_us": r["p99_us"]}
        else:
            r = bench.connrate(CORP_V4, SERVER_PORT)
            out = {"per_s": r["per_s"]}
        cpu, threads1 = cpu_seconds(agent.proc.pid) - cpu0, by_thread(agent.proc.pid)
        idle = int(open("/proc/stat").readline().split()[4]) - idle0
    finally:
        agent.stop()
per = max(r["n"] if trips else r["done"], 1)
unit = "trip" if trips else "conn"
out[f"cpu_us_per_{unit}"] = round(cpu * 1e6 / per, 1)
for g in GROUPS:
    out[f"{g}_us_per_{unit}"] = round((threads1[g][0] - threads0[g][0]) / 1e3 / per, 1)
    out[f"{g}_switches_per_{unit}"] = round((threads1[g][1] - threads0[g][1]) / per, 2)
print(json.dumps({**out, "idle_ticks": idle}))
"""


def one_run(checkout: Path, seconds: float, trips: int = 0) -> dict:
    with workdir("tgpair-") as work:
        r = subprocess.run([sys.executable, "-c", _ONE, str(work), str(seconds), str(trips)],
                           cwd=checkout, env={**os.environ, "PYTHONPATH": str(checkout)},
                           capture_output=True, text=True, timeout=seconds + 300)
    if r.returncode != 0:
        raise RuntimeError(f"run of {checkout} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.pair", description=__doc__.split("\n")[0])
    p.add_argument("old", type=Path)
    p.add_argument("new", type=Path)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--latency", action="store_true", help="ping-pong instead of connections")
    p.add_argument("--trips", type=int, default=20_000)
    args = p.parse_args(argv)
    trips = args.trips if args.latency else 0
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    for i in range(args.rounds):
        for name in ("old", "new"):
            r = one_run(getattr(args, name).resolve(), args.seconds, trips)
            runs[name].append(r)
            print(json.dumps({"round": i + 1, "build": name, **r}), flush=True)
    for name, rs in runs.items():
        mean = {k: round(sum(r[k] for r in rs) / len(rs), 2) for k in rs[0]}
        print(json.dumps({"build": name, "mean": mean}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
