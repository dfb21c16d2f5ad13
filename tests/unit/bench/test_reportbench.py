"""bench.reportbench, run small so it cannot rot: it fills a store and
times the report's reading of it in a fresh process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]


def test_reportbench_reads_the_store_it_filled(tmp_path):
    r = subprocess.run([sys.executable, "-m", "bench.reportbench", "--sessions", "150", "--bulk", "2",
                        str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sessions"] == 150
    assert out["store_MB"] > 2 * 2 * 65536 / 1e6 and out["MBps"] > 0 and out["peak_rss_MiB"] > 10
