"""Durable ingest throughput: signed single-example contributions per second accepted by the
coordinator from concurrent streaming clients, against a bare gRPC echo server with the same
message sizes and the same stream shape, measured in the same run.

    python bench/ingest.py [--clients 8] [--per-client 2500] [--repeat 2]

Each client is its own process and signs its envelopes before the clock starts (in both runs),
so the figures compare what the servers do: verify, validate, commit (fsync, group commit),
sign a receipt, answer -- versus echoing bytes. The coordinator runs with its default
durability (SQLite WAL, synchronous=FULL) and a rate limit high enough not to interfere.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ECHO_METHOD = "/bench.Echo/Stream"


def _payloads(n: int, seed: int, coordinator: bytes):
    from crowdsft.envelope import sign_contribution
    from crowdsft.keys import Identity

    identity = Identity.generate()
    return [
        sign_contribution(
            identity,
            [
                {
                    "prompt": f"Question {seed}-{i}: how does a LoRA adapter change a model's "
                    "behaviour?",
                    "response": f"Answer {seed}-{i}: it adds a trained low-rank update to "
                    "selected weight matrices while the pretrained weights stay frozen, so the "
                    "change is small and cheap.",
                }
            ],
            coordinator=coordinator,
        )
        for i in range(n)
    ]


def _client(kind: str, address: str, n: int, seed: int, barrier, results) -> None:
    import grpc

    from crowdsft.v1 import coordinator_pb2, coordinator_pb2_grpc

    channel = grpc.insecure_channel(address)
    grpc.channel_ready_future(channel).result(timeout=30)
    if kind == "coordinator":  # the payloads name the coordinator they are for
        stub = coordinator_pb2_grpc.CoordinatorStub(channel)
        key = stub.GetCoordinatorInfo(coordinator_pb2.GetCoordinatorInfoRequest()).public_key
    else:
        key = bytes(32)  # the echo server reads nothing
    envs = _payloads(n, seed, key)
    if kind == "coordinator":
        call = coordinator_pb2_grpc.CoordinatorStub(channel).SubmitContributions
        requests = envs
    else:
        call = channel.stream_stream(ECHO_METHOD)
        requests = [e.SerializeToString() for e in envs]
    barrier.wait()
    t0 = time.perf_counter()
    ok = 0
    for r in call(iter(requests), timeout=600):
        if kind == "coordinator":
            ok += r.code == 0
        else:
            ok += 1
    t1 = time.perf_counter()
    channel.close()
    results.put((t0, t1, ok))


def _echo_server(ready, stop, reply_size: int) -> None:
    from concurrent import futures

    import grpc

    reply = os.urandom(reply_size)

    def stream(request_iterator, context):
        for _ in request_iterator:
            yield reply

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=64))
    handler = grpc.method_handlers_generic_handler(
        "bench.Echo",
        {"Stream": grpc.stream_stream_rpc_method_handler(stream, lambda b: b, lambda b: b)},
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    ready.put(port)
    stop.wait()
    server.stop(0)


def _coordinator_server(ready, stop, root: str) -> None:
    import logging

    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.coordinator.server.scaffold import init_coordinator
    from crowdsft.testing.load import one_address

    logging.basicConfig(level=logging.WARNING)
    config = load_coordinator_config(init_coordinator(Path(root), listen="127.0.0.1:0"))
    config = one_address(config)  # capacity, not limits: every client is on one address
    sys.setswitchinterval(config.server.switch_interval_ms / 1000)  # as `coordinator serve`
    coord = Coordinator(config).start()
    ready.put(coord.port)
    stop.wait()
    coord.stop(0)


def _receipt_size() -> int:
    """Bytes of a SubmitResult carrying a signed receipt, as the coordinator sends."""
    from crowdsft.envelope import sign_receipt
    from crowdsft.keys import Identity
    from crowdsft.v1 import coordinator_pb2, envelope_pb2

    ident = Identity.generate()
    receipt = envelope_pb2.Receipt(
        contribution_id=b"\x01" * 32,
        node_id="0" * 32,
        accepted_at_ms=int(time.time() * 1000),
        example_count=1,
        coordinator_public_key=ident.public_key,
    )
    result = coordinator_pb2.SubmitResult(
        index=1000, contribution_id=b"\x01" * 32, receipt=sign_receipt(ident, receipt)
    )
    return result.ByteSize()


def run(kind: str, clients: int, per_client: int) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    ready, stop = ctx.Queue(), ctx.Event()
    with tempfile.TemporaryDirectory(prefix="crowdsft-bench-") as tmp:
        if kind == "coordinator":
            server = ctx.Process(target=_coordinator_server, args=(ready, stop, tmp))
        else:
            server = ctx.Process(target=_echo_server, args=(ready, stop, _receipt_size()))
        server.start()
        port = ready.get(timeout=60)
        barrier, results = ctx.Barrier(clients), ctx.Queue()
        procs = [
            ctx.Process(
                target=_client, args=(kind, f"127.0.0.1:{port}", per_client, k, barrier, results)
            )
            for k in range(clients)
        ]
        for p in procs:
            p.start()
        spans = [results.get(timeout=900) for _ in procs]
        for p in procs:
            p.join()
        stop.set()
        server.join(60)
        if kind == "coordinator":
            from crowdsft.coordinator.store.db import connect

            conn = connect(Path(tmp) / "data" / "coordinator.sqlite3", readonly=True)
            stored = conn.execute("SELECT COUNT(*) FROM contributions").fetchone()[0]
            conn.close()
        else:
            stored = sum(s[2] for s in spans)
    start = min(s[0] for s in spans)
    end = max(s[1] for s in spans)
    ok = sum(s[2] for s in spans)
    if ok != clients * per_client or stored != ok:
        raise SystemExit(f"{kind}: {ok} answered OK, {stored} stored, of {clients * per_client}")
    return ok / (end - start), ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--per-client", type=int, default=2500)
    ap.add_argument("--repeat", type=int, default=2, help="runs of each server; the median counts")
    ns = ap.parse_args()
    print(
        f"{ns.clients} streaming clients x {ns.per_client} signed single-example "
        f"contributions, {os.cpu_count()} CPUs",
        flush=True,
    )
    figures: dict[str, list[float]] = {"echo": [], "coordinator": []}
    for i in range(ns.repeat):
        for kind in ("echo", "coordinator"):
            rate, n = run(kind, ns.clients, ns.per_client)
            figures[kind].append(rate)
            print(f"  run {i + 1}: {kind:12} {rate:9.0f} msg/s ({n} messages)", flush=True)
    echo = statistics.median(figures["echo"])
    coord = statistics.median(figures["coordinator"])
    print(f"echo baseline:        {echo:9.0f} messages/s")
    print(f"coordinator (durable): {coord:8.0f} contributions/s")
    print(f"ratio:                {coord / echo:9.1%}")
    print(
        f"targets: >= 3000 contributions/s: {'met' if coord >= 3000 else 'NOT met'}; "
        f">= 40% of echo: {'met' if coord / echo >= 0.40 else 'NOT met'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
