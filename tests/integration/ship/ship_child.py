"""Run one Shipper.run_once() in its own process (the kill -9 test)."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[3]))

from agent.config import Config, ShipConfig  # noqa: E402
from agent.ship import Shipper  # noqa: E402

if __name__ == "__main__":
    store_dir, ship = sys.argv[1], json.loads(sys.argv[2])
    Shipper(Config(ship=ShipConfig(**ship)), store_dir).run_once()
