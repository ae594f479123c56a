"""Load: many nodes uploading at once over loopback, each over its own upload stream.

``run_load`` signs every node's contributions first (signing is the node's cost, not the
coordinator's), then starts all nodes together and times each acknowledgement from the moment
gRPC takes the envelope off the node's stream to the moment its result comes back. It returns
the figures and every result, so that callers can check that nothing was lost or duplicated.
Used by ``tests/testing/test_load.py`` and ``bench/load.py``.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np

from crowdsft.envelope import contribution_id, sign_contribution
from crowdsft.keys import Identity
from crowdsft.node.client import CoordinatorClient
from crowdsft.v1 import coordinator_pb2_grpc, envelope_pb2

# Bulk load from this machine's one address: the per-node and per-address limits out of the
# way (they are for a crowd spread over many addresses), so that capacity and correctness
# are what is measured. Sections and keys of coordinator.toml.
ONE_ADDRESS: dict[str, dict[str, float | int]] = {
    "rate_limit": {
        "contributions_per_s": 1e9,
        "burst": 10**9,
        "bytes_per_s": 1e12,
        "burst_bytes": 10**12,
        "peer_requests_per_s": 1e9,
        "peer_burst": 10**9,
        "peer_bytes_per_s": 1e12,
        "peer_burst_bytes": 10**12,
    },
    "server": {
        "max_streams_per_peer": 1024,
        "max_watch_streams_per_peer": 1024,
        "max_calls_per_peer": 4096,
        "worker_turns_per_peer": 1024,
    },
}


def one_address(config: Any) -> Any:
    """``config`` (a CoordinatorConfig) with the ``ONE_ADDRESS`` settings."""
    return dataclasses.replace(
        config,
        **{
            section: dataclasses.replace(getattr(config, section), **values)
            for section, values in ONE_ADDRESS.items()
        },
    )


@dataclass
class LoadResult:
    window: int
    nodes: int
    per_node: int
    seconds: float
    latencies_s: list[float]
    codes: dict[int, int]
    acknowledged: set[bytes] = field(default_factory=set)  # contribution ids with a receipt
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return self.nodes * self.per_node

    @property
    def throughput(self) -> float:
        return len(self.acknowledged) / self.seconds if self.seconds else 0.0

    def percentile_ms(self, q: float) -> float:
        return float(np.percentile(self.latencies_s, q) * 1000) if self.latencies_s else 0.0

    def summary(self) -> dict:
        return {
            "nodes": self.nodes,
            "contributions_per_node": self.per_node,
            "in_flight_per_node": self.window or "unbounded",
            "acknowledged": len(self.acknowledged),
            "seconds": round(self.seconds, 2),
            "throughput_per_s": round(self.throughput, 1),
            "ack_latency_p50_ms": round(self.percentile_ms(50), 1),
            "ack_latency_p99_ms": round(self.percentile_ms(99), 1),
            "codes": {str(k): v for k, v in sorted(self.codes.items())},
            "errors": self.errors[:5],
        }


def _envelopes(
    identity: Identity, n: int, tag: str, coordinator: bytes
) -> list[envelope_pb2.SignedEnvelope]:
    return [
        sign_contribution(
            identity,
            [
                {
                    "prompt": f"[{tag}] {identity.node_id} asks question {i}: what changes "
                    "when a model is fine-tuned on examples like this one?",
                    "response": f"Answer {i} from {identity.node_id[:8]}: the weights move "
                    "towards responses like this one, a little per step.",
                }
            ],
            coordinator=coordinator,
        )
        for i in range(n)
    ]


def run_load(
    address: str,
    nodes: int = 50,
    per_node: int = 400,
    tag: str = "load",
    timeout_s: float = 600,
    window: int = 16,
) -> LoadResult:
    """``window``: contributions a node keeps in flight at most (0: no limit, the whole batch
    is pushed at once and latency becomes mostly time spent queued behind it)."""
    identities = [Identity.generate() for _ in range(nodes)]
    with CoordinatorClient(address, timeout=30) as info_client:
        key = info_client.coordinator_key
    batches = [_envelopes(ident, per_node, tag, key) for ident in identities]
    sent_at: list[dict[int, float]] = [{} for _ in range(nodes)]
    latencies: list[list[float]] = [[] for _ in range(nodes)]
    codes: list[dict[int, int]] = [{} for _ in range(nodes)]
    acked: list[set[bytes]] = [set() for _ in range(nodes)]
    errors: list[str] = []
    start = threading.Barrier(nodes + 1)

    def node(k: int) -> None:
        # A connection per node, as separate nodes would have.
        channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        envs = batches[k]
        slots = threading.Semaphore(window) if window > 0 else None

        def requests() -> Iterator[envelope_pb2.SignedEnvelope]:
            for i, env in enumerate(envs):
                if slots is not None:
                    slots.acquire()
                sent_at[k][i] = time.perf_counter()
                yield env

        try:
            start.wait()
            for result in stub.SubmitContributions(requests(), timeout=timeout_s):
                latencies[k].append(time.perf_counter() - sent_at[k][result.index])
                if slots is not None:
                    slots.release()
                codes[k][result.code] = codes[k].get(result.code, 0) + 1
                if result.code == 0 or (result.code == 6 and result.HasField("receipt")):
                    acked[k].add(contribution_id(envs[result.index].payload))
        except grpc.RpcError as err:
            errors.append(f"node {k}: {err.code().name}: {err.details()}")
        finally:
            channel.close()

    threads = [threading.Thread(target=node, args=(k,), daemon=True) for k in range(nodes)]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - t0
    merged: dict[int, int] = {}
    for c in codes:
        for code, n in c.items():
            merged[code] = merged.get(code, 0) + n
    return LoadResult(
        window=window,
        nodes=nodes,
        per_node=per_node,
        seconds=seconds,
        latencies_s=[x for lat in latencies for x in lat],
        codes=merged,
        acknowledged=set().union(*acked),
        errors=errors,
    )
