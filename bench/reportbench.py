"""How long `tollgate report` takes to read a store, and its peak memory.

    python -m bench.reportbench [--sessions 20000] [--bulk 160] [WORKDIR]

Fills a store with short HTTP sessions (five requests and 2 KB responses
each, as a Kubernetes client makes) and, every hundredth session, BULK
64 KiB records of bulk data; then times report.gather (every view the page
shows, the store's verify included) in a fresh process. To compare two
checkouts, run it from each (cwd), on the same WORKDIR.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from agent.store import Direction, Kind, StoreWriter

_REQUEST = (b"GET /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: k8s\r\n"
            b"User-Agent: kubectl\r\n\r\n")
_RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Length: 2000\r\n\r\n" + b"x" * 2000


def fill(store: Path, sessions: int, bulk: int) -> int:
    """The store's bytes."""
    w = StoreWriter(store, immutable=False)
    for i in range(sessions):
        sid = w.append_json(Kind.SESSION_OPEN, {"client": ["10.77.0.1", 40000 + i % 20000],
                                                "original_dst": ["10.77.0.2", 80]})
        w.append_json(Kind.SESSION_INFO, {"session": sid, "uid": 1000, "chain": [
            {"pid": 10, "comm": "kubectl", "argv": ["kubectl", "get", "pods"], "user": "devin"}]})
        for _ in range(5):
            w.append_data(sid, Direction.CLIENT, _REQUEST)
            w.append_data(sid, Direction.SERVER, _RESPONSE)
        for k in range(bulk if i % 100 == 0 else 0):
            w.append_data(sid, Direction(k & 1), bytes(64 << 10))
        w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed"})
    w.close()
    return sum(p.stat().st_size for p in store.glob("*.seg"))


def _gather(store: str) -> None:
    from agent.review.report import gather
    t0 = time.perf_counter()
    d = gather(store)
    print(json.dumps({"gather_s": time.perf_counter() - t0, "sessions": len(d.sessions),
                      "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--sessions", type=int, default=20_000)
    ap.add_argument("--bulk", type=int, default=160)
    ap.add_argument("--gather", help=argparse.SUPPRESS)
    ap.add_argument("workdir", nargs="?")
    a = ap.parse_args()
    if a.gather:
        return _gather(a.gather)
    work = Path(a.workdir or tempfile.mkdtemp(prefix="tg-reportbench-"))
    store = work / "store"
    size = (sum(p.stat().st_size for p in store.glob("*.seg")) if store.exists()
            else fill(store, a.sessions, a.bulk))
    out = subprocess.run([sys.executable, "-m", "bench.reportbench", "--gather", str(store)],
                         check=True, capture_output=True, text=True).stdout
    result = json.loads(out)
    print(json.dumps({**result, "store_MB": size / 1e6, "MBps": size / 1e6 / result["gather_s"]}))


if __name__ == "__main__":
    main()
