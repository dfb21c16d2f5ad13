"""Building configs and recorded sessions for the shipper tests."""

from __future__ import annotations

import time
from pathlib import Path

from agent.config import Config, ShipConfig
from agent.store.format import Direction, Kind
from agent.store.writer import StoreWriter
from tests.fakes.cloud_logging import FakeCloudLogging


def ship_config(server: FakeCloudLogging, state_dir: Path, **over) -> Config:
    """A config for the fake server; fast retries unless a test warps time."""
    values = dict(enabled=True, project_id="proj", endpoint=server.address, insecure=True,
                  instance_id="1234567890", zone="europe-west1-b", state_dir=str(state_dir),
                  rpc_timeout_s=5.0, retry_initial_s=0.001, retry_max_s=0.01,
                  poll_interval_s=0.05)
    values.update(over)
    return Config(ship=ShipConfig(**values))


def write_session(store: StoreWriter, chunks: int = 10, subject: str = "devin",
                  t0: int | None = None) -> list[int]:
    """One recorded session: open, info, data both ways, close. Returns seqs."""
    t = t0 or time.time_ns() - 10_000_000_000
    sid = store.append_json(Kind.SESSION_OPEN, {
        "client": ["10.0.0.2", 40000], "original_dst": ["93.184.216.34", 443],
        "uid": 1001, "subject": subject}, t)
    seqs = [sid, store.append_json(Kind.SESSION_INFO, {"session": sid, "pid": 42}, t + 1)]
    for i in range(chunks):
        d = Direction.CLIENT if i % 2 == 0 else Direction.SERVER
        seqs.append(store.append_data(sid, d, f"chunk {i} of {sid}".encode() * 20,
                                      t + 10 + i))
    seqs.append(store.append_json(Kind.SESSION_CLOSE, {"session": sid, "reason": "eof"},
                                  t + 1000))
    return seqs
