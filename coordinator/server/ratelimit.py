"""The per-node rate limit. (Admission policies are plugins: ``crowdsft.plugins.admission``.)"""

from __future__ import annotations

import threading
import time

from crowdsft.config import RateLimitConfig
from crowdsft.errors import RateLimitedError


class RateLimiter:
    """A token bucket per node, in memory (it resets with the process, which is harmless)."""

    def __init__(self, config: RateLimitConfig, clock=time.monotonic) -> None:
        self.rate = config.contributions_per_s
        self.burst = float(config.burst)
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, node_id: str) -> None:
        """Spend one token for ``node_id`` or raise RateLimitedError with the wait needed."""
        now = self._clock()
        with self._lock:
            tokens, last = self._buckets.get(node_id, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            if tokens < 1.0:
                self._buckets[node_id] = (tokens, now)
                wait = (1.0 - tokens) / self.rate
                raise RateLimitedError(
                    f"node {node_id} is over the rate limit of {self.rate:g} contributions/s "
                    f"(burst {self.burst:g}); retry in {wait:.2f}s",
                    retry_after_s=wait,
                )
            self._buckets[node_id] = (tokens - 1.0, now)
