"""Runs the fake Cloud Logging server as a process (inside the sandbox's
bastion namespace, where the agent is) and appends each received entry's
insertId and log name to a file."""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT))

from tests.fakes.cloud_logging import FakeCloudLogging  # noqa: E402

port_file, out = sys.argv[1], sys.argv[2]
srv = FakeCloudLogging().start()
Path(port_file).write_text(str(srv.port))
seen = 0
while True:
    time.sleep(0.1)
    entries = list(srv.entries)
    with open(out, "a") as f:
        for e in entries[seen:]:
            f.write(f"{e.insert_id} {e.log_name}\n")
    seen = len(entries)
