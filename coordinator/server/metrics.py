"""Prometheus metrics of a coordinator (``[metrics] listen``; off by default).

Counted as they happen, in the serving process:

* ``crowdsft_contributions_total{code}``: contributions answered, by gRPC status code
  (``OK`` for accepted; a stream's envelopes are counted one by one);
* ``crowdsft_ingest_seconds``: how long a unary submission took, from its arrival to its
  answer (a histogram);
* ``crowdsft_rounds_finished_total``, ``crowdsft_round_seconds`` and
  ``crowdsft_candidate_training_seconds``: rounds run in this process (automatic rounds), from
  planning (or resumption) to finish, and each candidate from the start of its training to
  its adapter's arrival.

Read from the store at each scrape (so they also count what other processes did, such as
``crowdsft coordinator round``):

* ``crowdsft_nodes``, ``crowdsft_ledger_height`` (the last round in the signed ledger),
  ``crowdsft_store_bytes`` (database, its journal, and payload files).

Each coordinator has a registry of its own, so several in one process do not mix.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from crowdsft.errors import ConfigError

from ..store.db import Store

INGEST_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
ROUND_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200)


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError:
        raise ConfigError(
            'metrics.listen serves metrics and the live page, which need the "monitor" '
            "extra: pip install 'crowd-sft[monitor]'"
        ) from None
    return prometheus_client


def store_bytes(db_path: Path) -> int:
    """The database, its write-ahead journal, and the payload files beside it."""
    total = 0
    for path in (db_path, db_path.with_name(db_path.name + "-wal")):
        if path.exists():
            total += path.stat().st_size
    payloads = db_path.with_name(db_path.name + ".payloads")
    if payloads.is_dir():
        total += sum(p.stat().st_size for p in payloads.iterdir() if p.is_file())
    return total


class _StoreCollector:
    """Gauges read from the store at each scrape."""

    def __init__(self, store: Store, db_path: Path) -> None:
        self.store = store
        self.db_path = db_path

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        nodes = self.store.query("SELECT COUNT(*) FROM nodes")[0][0]
        height = self.store.query("SELECT COALESCE(MAX(round_id), 0) FROM ledger")[0][0]
        yield GaugeMetricFamily("crowdsft_nodes", "Nodes registered.", value=nodes)
        yield GaugeMetricFamily(
            "crowdsft_ledger_height", "The last round in the signed ledger.", value=height
        )
        yield GaugeMetricFamily(
            "crowdsft_store_bytes",
            "Bytes on disk: the database, its journal and the payload files.",
            value=store_bytes(self.db_path),
        )


class Metrics:
    """The coordinator's metrics; ``registry`` is what ``/metrics`` serves."""

    def __init__(self, store: Store, db_path: Path) -> None:
        p = _prometheus()
        self.registry = p.CollectorRegistry()
        r = self.registry
        self.contributions = p.Counter(
            "crowdsft_contributions",
            "Contributions answered, by gRPC status code (OK: accepted).",
            ["code"],
            registry=r,
        )
        self.ingest_seconds = p.Histogram(
            "crowdsft_ingest_seconds",
            "Seconds from a unary submission's arrival to its answer.",
            buckets=INGEST_BUCKETS,
            registry=r,
        )
        self.rounds_finished = p.Counter(
            "crowdsft_rounds_finished", "Rounds finished in this process.", registry=r
        )
        self.round_seconds = p.Histogram(
            "crowdsft_round_seconds",
            "Seconds from a round's planning (or resumption) to its finish.",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        self.candidate_seconds = p.Histogram(
            "crowdsft_candidate_training_seconds",
            "Seconds from the start of a candidate's training to its adapter's arrival.",
            buckets=ROUND_BUCKETS,
            registry=r,
        )
        r.register(_StoreCollector(store, db_path))
        self._started: dict[Any, float] = {}

    def submitted(self, code: str, seconds: float | None = None) -> None:
        """One contribution answered with ``code``; ``seconds``: a unary call's latency."""
        self.contributions.labels(code=code).inc()
        if seconds is not None:
            self.ingest_seconds.observe(seconds)

    def on_event(self, kind: str, info: dict[str, Any]) -> None:
        """A round runner's event (``RoundRunner(on_event=...)``)."""
        now = time.monotonic()
        rid = info.get("round_id")
        if kind in ("round_planned", "round_resumed"):
            self._started[rid] = now
        elif kind == "candidate_training":
            self._started[(rid, info.get("group"))] = now
        elif kind == "candidate_trained":
            began = self._started.pop((rid, info.get("group")), None)
            if began is not None:
                self.candidate_seconds.observe(now - began)
        elif kind == "round_finished":
            self.rounds_finished.inc()
            began = self._started.pop(rid, None)
            if began is not None:
                self.round_seconds.observe(now - began)
            for key in [k for k in self._started if isinstance(k, tuple) and k[0] == rid]:
                del self._started[key]
