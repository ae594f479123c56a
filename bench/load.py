"""Load: 50 concurrent nodes uploading 400 signed contributions each over loopback while
fine-tuning rounds run; prints throughput and p50/p99 acknowledgement latency, and checks
that nothing was lost or duplicated.

    python bench/load.py [--nodes 50] [--per-node 400] [--json]

The coordinator is its own process (``python -m crowdsft.testing.crash serve``: the real
server and store, with rounds over the model-free stand-in space, 0.5 s per step, running
back to back). Nodes are threads of this process, each with its own channel and upload
stream; every node signs its contributions before the clock starts.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path


def set_keys(text: str, **values: object) -> str:
    """``text`` (a coordinator.toml) with each ``key = ...`` line set to its value; a key
    that is not there exactly once is an error, not a silent no-op."""
    for key, value in values.items():
        text, n = re.subn(rf"(?m)^{key} = .*$", f"{key} = {value}", text)
        if n != 1:
            raise SystemExit(f"coordinator.toml has {n} lines setting {key!r}; expected one")
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=50)
    parser.add_argument("--per-node", type=int, default=400)
    parser.add_argument("--step-delay", type=float, default=0.5)
    parser.add_argument(
        "--window",
        type=int,
        default=16,
        help="contributions each node keeps in flight (0: push the whole batch at once)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.server.scaffold import init_coordinator
    from crowdsft.coordinator.store.db import connect
    from crowdsft.testing.crash import Process, free_port
    from crowdsft.testing.load import ONE_ADDRESS, run_load

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "coordinator"
        address = f"127.0.0.1:{free_port()}"
        path = init_coordinator(root, listen=address)
        # Every node runs on this machine's one address (see ONE_ADDRESS).
        limits = {k: v for values in ONE_ADDRESS.values() for k, v in values.items()}
        path.write_text(set_keys(path.read_text(), groups=2, **limits))
        process = Process(path, args.step_delay, root / "coordinator.log")
        process.start()
        try:
            warm = run_load(address, nodes=4, per_node=5, tag="warm-up")  # lets a round start
            time.sleep(1.0)
            result = run_load(address, nodes=args.nodes, per_node=args.per_node, window=args.window)
        finally:
            process.terminate(120)
        conn = connect(load_coordinator_config(path).db_path, readonly=True)
        ids = [bytes(r[0]) for r in conn.execute("SELECT id FROM contributions")]
        rounds = conn.execute("SELECT COUNT(*) FROM rounds WHERE status='finished'").fetchone()[0]
        conn.close()
    stored = set(ids)
    figures = result.summary() | {
        "lost": len(result.acknowledged - stored),
        "duplicated": len(ids) - len(stored),
        "stored": len(ids) - len(warm.acknowledged),
        "rounds_finished_meanwhile": rounds,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"{args.nodes} nodes x {args.per_node} contributions, {figures['in_flight_per_node']} "
            f"in flight per node: {figures['acknowledged']} "
            f"acknowledged in {figures['seconds']} s = {figures['throughput_per_s']}/s; "
            f"ack latency p50 {figures['ack_latency_p50_ms']} ms, "
            f"p99 {figures['ack_latency_p99_ms']} ms"
        )
        print(
            f"lost {figures['lost']}, duplicated {figures['duplicated']}, "
            f"rounds finished meanwhile: {rounds}"
        )
    ok = figures["lost"] == 0 and figures["duplicated"] == 0 and not result.errors
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
