"""Crash safety, longer than the test: SIGKILL the coordinator many times at random moments
while nodes submit and rounds run, then check everything (``crowdsft.testing.crash``).

    python bench/crash.py [--kills 100] [--nodes 8] [--contributions 200] [--seed 0] [--json]
    python bench/crash.py --ray [--kills 20] ...

``--ray``: rounds train the tiny LM for real, as Ray tasks on a cluster started beside the
coordinator (``ray start`` on loopback, two CPUs), which outlives every kill.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=100)
    parser.add_argument("--nodes", type=int, default=8)
    parser.add_argument("--contributions", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--ray", action="store_true", help="tiny LM, trained on a Ray cluster")
    parser.add_argument(
        "--pace",
        type=float,
        help="mean seconds between a node's contributions (default 0.05; 1.0 with --ray, "
        "whose restarts take seconds, so that data keeps coming and rounds keep running)",
    )
    args = parser.parse_args()

    from crowdsft.testing.crash import run_harness

    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        log = Path(tmp) / "coordinator" / "coordinator.log"
        model = address = None
        if args.ray:
            from crowdsft.testing.raycluster import ray_cluster
            from crowdsft.testing.tiny import tiny_model

            model = Path(tmp) / "tiny-model"
            for part in tiny_model():
                part.save_pretrained(model)
            address = stack.enter_context(ray_cluster(nodes=1, cpus=2))
        report = run_harness(
            Path(tmp) / "coordinator",
            kills=args.kills,
            nodes=args.nodes,
            contributions=args.contributions,
            pace_s=args.pace if args.pace is not None else 1.0 if args.ray else 0.05,
            seed=args.seed,
            say=(lambda s: None) if args.json else (lambda s: print(s, file=sys.stderr)),
            model=model,
            ray_address=address,
        )
        resumed = log.read_text().count("resuming round") if log.exists() else 0
    figures = {
        "executor": "ray" if args.ray else "stand-in",
        "kills": report.kills,
        "acknowledged": report.acknowledged,
        "rounds": report.rounds,
        "payload_files": report.payload_files,
        "round_resumptions_after_a_kill": resumed,
        "kills_in_round": report.kills_in_round,
        "kills_in_upload": report.kills_in_upload,
        "seconds": round(report.seconds, 1),
        "problems": report.problems,
    }
    if args.json:
        print(json.dumps(figures, indent=2))
    else:
        print(
            f"{report.kills} SIGKILLs ({report.kills_in_round} during a round, "
            f"{report.kills_in_upload} during an upload); "
            f"{report.acknowledged} contributions acknowledged; "
            f"{report.rounds} rounds; an interrupted round was resumed {resumed} times; "
            f"{report.seconds:.0f} s"
        )
        print("all checks passed" if report.ok else "\n".join(report.problems))
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
