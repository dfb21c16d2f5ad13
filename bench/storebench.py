"""Store, verify and shipper throughput, in one process (run by bench in the
bastion namespace; the fake Cloud Logging listens on its loopback).

    python -m bench.storebench MIB WORKDIR   -> one JSON line
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import blake3

from agent.store.format import Direction, Kind
from agent.store.writer import StoreWriter

CHUNK = 64 << 10


def _fill(store_dir: Path, total: int, chunk: int) -> tuple[float, int]:
    """Sessions of DATA records, as the proxy writes them; returns (seconds, bytes)."""
    w = StoreWriter(store_dir, immutable=False)
    data = bytes(chunk)
    t0 = time.perf_counter()
    sid, n = None, 0
    for i in range(total // chunk):
        if i % 256 == 0:
            if sid is not None:
                w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed"})
            sid = w.append_json(Kind.SESSION_OPEN, {"client": ["10.77.0.1", 40000 + i % 20000],
                                                    "original_dst": ["10.77.0.2", 9000]})
        w.append_data(sid, Direction(i & 1), data)
        n += chunk
    w.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "closed"})
    w.close()
    return time.perf_counter() - t0, n


def _store_bytes(store_dir: Path) -> int:
    return sum(p.stat().st_size for p in store_dir.glob("*.seg"))


def append_rate(work: Path, total: int) -> float:
    secs, n = _fill(work / "append", total, CHUNK)
    return n / secs / 1e6


def verify_rate(work: Path) -> float | str:
    try:
        from agent.store.verify import verify
    except ImportError:
        return "n/a (agent.store.verify absent)"
    d = work / "append"
    t0 = time.perf_counter()
    report = verify(d)
    secs = time.perf_counter() - t0
    ok = getattr(report, "ok", True)
    if not ok:
        return f"n/a (verify failed: {getattr(report, 'failure', report)})"
    return _store_bytes(d) / secs / 1e6


def ship_rate(work: Path, total: int) -> float | str:
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from agent.config import Config, ShipConfig
        from agent.ship import Shipper
        from tests.fakes.cloud_logging import FakeCloudLogging
    except ImportError as e:
        return f"n/a ({e})"
    d = work / "ship"
    # Smaller chunks: the shipper sends each DATA record as one log entry.
    _fill(d, total, 16 << 10)
    server = FakeCloudLogging().start()
    try:
        cfg = Config(ship=ShipConfig(
            enabled=True, project_id="bench", endpoint=server.address, insecure=True,
            instance_id="1", zone="bench-zone", state_dir=str(work / "ship-state"),
            rpc_timeout_s=30.0, retry_initial_s=0.01, retry_max_s=0.1))
        shipper = Shipper(cfg, d, state_dir=work / "ship-state")
        t0 = time.perf_counter()
        for _ in range(100_000):  # bounded: each round ships at least one batch
            if shipper.run_once().records == 0:
                break
        secs = time.perf_counter() - t0
        shipper.close()
    finally:
        server.stop()
    if not server.entries:
        return "n/a (nothing shipped)"
    return _store_bytes(d) / secs / 1e6


def machine_rates(work: Path, total: int) -> dict[str, float]:
    """What bounds a recording relay on this machine, measured on the store's
    filesystem: BLAKE3 (every recorded byte is hashed), writes into the page
    cache (durability "write"), and the disk behind it (write, then fsync)."""
    os.sync()  # start from a clean page cache, as each relay run does
    block, n = os.urandom(256 << 10), max(total // (256 << 10), 1)
    t0 = time.perf_counter()
    for _ in range(n):
        blake3.blake3(block).digest()
    rates = {"blake3_MBps": n * len(block) / (time.perf_counter() - t0) / 1e6}
    for key, sync in (("pagecache_MBps", False), ("disk_MBps", True)):
        path = work / f"raw-{key}"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        t0 = time.perf_counter()
        for _ in range(n):
            os.write(fd, block)
        if sync:
            os.fsync(fd)
        rates[key] = n * len(block) / (time.perf_counter() - t0) / 1e6
        os.close(fd)
        path.unlink()
    return rates


def main() -> None:
    total, work = int(sys.argv[1]) << 20, Path(sys.argv[2])
    work.mkdir(parents=True, exist_ok=True)
    out = machine_rates(work, total)
    out["append_MBps"] = append_rate(work, total)
    out["verify_MBps"] = verify_rate(work)
    out["ship_MBps"] = ship_rate(work, max(total // 4, 1 << 20))
    print(json.dumps(out))


if __name__ == "__main__":
    main()
