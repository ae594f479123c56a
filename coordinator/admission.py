"""Who may submit: the admission policy and the per-node rate limit."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

from crowdsft.config import AdmissionConfig, RateLimitConfig
from crowdsft.errors import ConfigError, NotAdmittedError, RateLimitedError
from crowdsft.node.keys import node_id_from_public_key

_NODE_ID = re.compile(r"^[0-9a-f]{32}$")
_PUBLIC_KEY = re.compile(r"^[0-9a-f]{64}$")


def read_allowlist(entries: tuple[str, ...], file: Path | None) -> frozenset[str]:
    """Node ids from config entries and an optional file: node ids or hex public keys."""
    lines: list[tuple[str, str]] = [(e, "admission.allowlist") for e in entries]
    if file is not None:
        try:
            text = file.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read allowlist file {file}: {exc.strerror}") from None
        for n, line in enumerate(text.splitlines(), 1):
            entry = line.split("#", 1)[0].strip()
            if entry:
                lines.append((entry, f"{file}:{n}"))
    ids = set()
    for entry, where in lines:
        e = entry.lower()
        if _NODE_ID.match(e):
            ids.add(e)
        elif _PUBLIC_KEY.match(e):
            ids.add(node_id_from_public_key(bytes.fromhex(e)))
        else:
            raise ConfigError(
                f"{where}: {entry!r} is neither a node id (32 hex) nor a public key (64 hex)"
            )
    return frozenset(ids)


class Admission:
    """The admission policy: ``open`` admits every authenticated node, ``allowlist`` only the
    listed ones."""

    def __init__(self, config: AdmissionConfig, base_dir: Path) -> None:
        self.policy = config.policy
        file = config.allowlist_file
        if file is not None and not file.is_absolute():
            file = base_dir / file
        self.allowed = read_allowlist(config.allowlist, file)

    def check(self, node_id: str) -> None:
        if self.policy == "allowlist" and node_id not in self.allowed:
            raise NotAdmittedError(
                f"node {node_id} is not on this coordinator's allowlist; ask the operator to add it"
            )


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
