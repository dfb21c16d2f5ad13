"""Ships the store to Google Cloud Logging, losslessly and idempotently.

entries: record -> LogEntry (split past 256 KiB); cursor: shipped position,
persisted atomically; transport: the library's gRPC client; retry: backoff
without limit; sender: one batch until written or quarantined; lane: cursor +
batching for one class of records; shipper: the lanes, backlog, statistics.
"""

from agent.ship.shipper import Shipper, ShipperBusy, ShipResult, ShipStatistics
from agent.ship.transport import TransportError

__all__ = ["Shipper", "ShipperBusy", "ShipResult", "ShipStatistics", "TransportError"]
