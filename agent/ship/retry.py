"""tollgate's retry policy: jittered exponential backoff, no attempt limit.

Transient codes (UNAVAILABLE, DEADLINE_EXCEEDED, INTERNAL, RESOURCE_EXHAUSTED)
are retried until they succeed or the shipper is stopped: a record is never
dropped because the path was down. (The library's default retry gives up and
does not cover RESOURCE_EXHAUSTED; fluent-bit drops on 429.) Clock and sleep
are injectable so tests can warp through hours of outage.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Callable, TypeVar

from google.api_core import exceptions as gexc

T = TypeVar("T")

TRANSIENT = (gexc.ServiceUnavailable, gexc.DeadlineExceeded,
             gexc.InternalServerError, gexc.ResourceExhausted)


class Stopped(Exception):
    """The shipper was asked to stop while waiting to retry."""


@dataclass
class Backoff:
    initial_s: float = 1.0
    maximum_s: float = 60.0
    multiplier: float = 2.0
    # sleep(seconds) -> True when asked to stop (threading.Event.wait fits).
    sleep: Callable[[float], bool | None] = time.sleep
    rng: random.Random = field(default_factory=random.Random)

    def delays(self):
        """Uniform in [cap/2, cap]: jitter so many agents do not retry in step,
        yet each wait keeps growing."""
        cap = self.initial_s
        while True:
            yield self.rng.uniform(cap / 2, cap)
            cap = min(cap * self.multiplier, self.maximum_s)

    def call(self, fn: Callable[[], T],
             on_retry: Callable[[Exception, float], None] = lambda e, d: None) -> T:
        """fn() until it returns or raises a non-transient error."""
        delays = self.delays()
        while True:
            try:
                return fn()
            except TRANSIENT as e:
                delay = next(delays)
                on_retry(e, delay)
                if self.sleep(delay):
                    raise Stopped() from e
