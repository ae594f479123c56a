"""Rate limits, in memory (they reset with the process, which is harmless).

Two layers, in the order a request meets them:

* ``PeerLimiter``, per peer address and before any signature is checked: requests and bytes
  per second, and a penalty for bad signatures (a peer that keeps sending them is refused
  before verification for a while). Nothing here trusts what a request claims, so nobody can
  spend another node's budget.
* ``RateLimiter``, per node and only after its signature checked out: contributions and bytes
  per second, and a small budget for registration and status calls.

Every limiter is a set of token buckets held in a bounded table: the stalest keys are
forgotten first, so a flood of fresh keys or addresses cannot grow memory without bound.
(Admission policies are plugins: ``crowdsft.plugins.admission``.)
"""

from __future__ import annotations

import ipaddress
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from urllib.parse import unquote

from crowdsft.config import RateLimitConfig
from crowdsft.errors import RateLimitedError

MAX_KEYS = 100_000


class Buckets:
    """Token buckets by key: ``rate`` tokens per second up to ``burst``."""

    def __init__(
        self,
        rate: float,
        burst: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = MAX_KEYS,
    ) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._clock = clock
        self._max_keys = max_keys
        self._table: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def _tokens(self, key: str, now: float) -> float:
        tokens, last = self._table.get(key, (self.burst, now))
        return min(self.burst, tokens + (now - last) * self.rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._table[key] = (tokens, now)
        self._table.move_to_end(key)
        while len(self._table) > self._max_keys:
            self._table.popitem(last=False)

    def take(self, key: str, cost: float = 1.0) -> float:
        """Spend ``cost`` tokens and return 0, or spend nothing and return the seconds until
        there would be enough (a cost above the burst can never be paid: infinity)."""
        if cost > self.burst:
            return float("inf")
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
            if tokens < cost:
                self._store(key, tokens, now)
                return (cost - tokens) / self.rate
            self._store(key, tokens - cost, now)
            return 0.0

    def wait(self, key: str, cost: float = 1.0) -> float:
        """What ``take`` would return, spending nothing."""
        if cost > self.burst:
            return float("inf")
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
        return 0.0 if tokens >= cost else (cost - tokens) / self.rate

    def charge(self, key: str, cost: float = 1.0) -> None:
        """Spend ``cost`` tokens whatever is left (down to zero): for penalties."""
        now = self._clock()
        with self._lock:
            self._store(key, max(0.0, self._tokens(key, now) - cost), now)

    def empty(self, key: str) -> float:
        """Seconds until ``key`` holds a whole token again (0 if it holds one now)."""
        now = self._clock()
        with self._lock:
            tokens = self._tokens(key, now)
        return 0.0 if tokens >= 1.0 else (1.0 - tokens) / self.rate

    def __len__(self) -> int:
        return len(self._table)


def _refuse(what: str, wait: float, limit: str) -> RateLimitedError:
    shown = "much later" if wait == float("inf") else f"in {wait:.2f}s"
    return RateLimitedError(f"{what} is over {limit}; retry {shown}", retry_after_s=min(wait, 3600))


def peer_host(peer: str) -> str:
    """The address a gRPC peer string counts against, without the port: ``ipv4:10.0.0.1:5000``
    and ``ipv6:[::ffff:10.0.0.1]:5000`` are both ``10.0.0.1``; an IPv6 address counts as its
    /64 network (``ipv6:[2001:db8::7]:5000`` is ``2001:db8::/64``), since one host holds a
    whole /64; Unix socket peers are ``unix``. (gRPC may percent-encode the brackets.)"""
    kind, _, rest = unquote(peer).partition(":")
    if kind == "ipv4":
        return rest.rpartition(":")[0] or rest
    if kind == "ipv6":
        host = (rest.rpartition(":")[0] if rest.startswith("[") else rest).strip("[]")
        host = host.split("%")[0]  # a zone index
        try:
            address = ipaddress.IPv6Address(host)
        except ValueError:
            return host
        if address.ipv4_mapped is not None:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network(f"{address}/64", strict=False))
    if kind.startswith("unix"):
        return "unix"
    return peer


class PeerLimiter:
    """Limits per peer address, applied before any signature is checked."""

    def __init__(self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic):
        c = config
        self.requests = Buckets(c.peer_requests_per_s, c.peer_burst, clock)
        self.bytes = Buckets(c.peer_bytes_per_s, c.peer_burst_bytes, clock)
        self.bad = Buckets(c.peer_bad_signatures_per_s, c.peer_bad_signature_burst, clock)
        self.config = config
        self._lock = threading.Lock()

    def admit(self, peer: str, nbytes: int) -> None:
        """Raise RateLimitedError unless this peer may send one more request of ``nbytes``."""
        host = peer_host(peer)
        penalty = self.bad.empty(host)
        if penalty:
            raise _refuse(f"peer {host}", penalty, "its allowance of requests with bad signatures")
        wait = self.requests.take(host)
        if wait:
            raise _refuse(f"peer {host}", wait, f"{self.config.peer_requests_per_s:g} requests/s")
        wait = self.bytes.take(host, nbytes)
        if wait:
            raise _refuse(f"peer {host}", wait, f"{self.config.peer_bytes_per_s:g} bytes/s")

    def bad_signature(self, peer: str) -> None:
        """A request from ``peer`` failed its signature check."""
        self.bad.charge(peer_host(peer))


class RateLimiter:
    """Limits per node, applied after its signature checked out."""

    def __init__(self, config: RateLimitConfig, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self.rate = config.contributions_per_s
        self.burst = float(config.burst)
        self.contributions = Buckets(config.contributions_per_s, config.burst, clock)
        self.bytes = Buckets(config.bytes_per_s, config.burst_bytes, clock)
        self.calls = Buckets(config.node_calls_per_s, config.node_calls_burst, clock)
        self._lock = threading.Lock()

    def take(self, node_id: str, nbytes: int = 0) -> None:
        """Spend one contribution and ``nbytes`` for ``node_id``, or raise RateLimitedError
        with the wait needed (and spend nothing)."""
        with self._lock:  # both budgets or neither
            self._take(node_id, nbytes)

    def check(self, node_id: str, nbytes: int = 0) -> None:
        """Raise RateLimitedError if ``take`` would, spending nothing (a look before work
        that proves the key, so that a node over its budget costs no heavy check)."""
        with self._lock:
            self._take(node_id, nbytes, spend=False)

    def _take(self, node_id: str, nbytes: int, spend: bool = True) -> None:
        count_wait = self.contributions.wait(node_id)
        if count_wait:
            raise _refuse(
                f"node {node_id}",
                count_wait,
                f"the rate limit of {self.rate:g} contributions/s (burst {self.burst:g})",
            )
        bytes_wait = self.bytes.wait(node_id, nbytes)
        if bytes_wait:
            raise _refuse(
                f"node {node_id}",
                bytes_wait,
                f"the byte quota of {self.config.bytes_per_s:g} bytes/s "
                f"(burst {self.config.burst_bytes:g} bytes)",
            )
        if spend:
            self.contributions.take(node_id)
            self.bytes.take(node_id, nbytes)

    def take_call(self, node_id: str) -> None:
        """Spend one registration or status call for ``node_id``."""
        wait = self.calls.take(node_id)
        if wait:
            raise _refuse(
                f"node {node_id}",
                wait,
                f"{self.config.node_calls_per_s:g} registration and status calls/s",
            )
