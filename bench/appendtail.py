"""How long one append of a small record takes, its tail included: the
stalls behind the chain's lock (faulting in the mapped window) that every
relay waits out. The writer runs as the daemon runs it (upkeep thread on).

    python -m bench.appendtail [--records 100000] [--size 100] [--dir /var/tmp]
        -> one JSON line: mean, p50, p99, p99.9, p99.99, max (us), windows mapped
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time

from agent.store import Direction, StoreWriter


def measure(directory: str, records: int, size: int) -> dict:
    d = tempfile.mkdtemp(prefix="tollgate-appendtail-", dir=directory)
    w = StoreWriter(d, immutable=False)
    w.start_maintenance(1.0)
    payload, took = b"x" * size, []
    clock = time.perf_counter_ns
    try:
        for _ in range(records):
            t = clock()
            w.append_data(1, Direction.CLIENT, payload)
            took.append(clock() - t)
        windows = w.chain.windows
    finally:
        w.close()
        shutil.rmtree(d)
    took.sort()

    def q(p: float) -> float:
        return round(took[min(len(took) - 1, int(p * len(took)))] / 1e3, 2)
    return {"records": records, "size": size, "mean_us": round(sum(took) / len(took) / 1e3, 2),
            "p50_us": q(0.5), "p99_us": q(0.99), "p99.9_us": q(0.999), "p99.99_us": q(0.9999),
            "max_us": round(took[-1] / 1e3, 1), "windows": windows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.appendtail", description=__doc__.split("\n")[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--size", type=int, default=100)
    p.add_argument("--dir", default="/var/tmp", help="where the store goes (its filesystem counts)")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.dir, a.records, a.size)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
