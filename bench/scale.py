"""One round of 4 candidates on SmolLM2, trained by the local executor (one after another in
this process) and by the Ray executor (4 Ray tasks on a local Ray with ``--workers``
one-CPU workers), from the same data and seed: wall time of each round, the speed-up, Ray's
start-up cost, whether both picked the same winner, and how many Ray nodes ran candidates.

    python bench/scale.py [--workers 2] [--seed 0] [--json]

The crowd and the training settings are the demo's (12 contributors, 4 groups of 3, 6 LoRA
steps per candidate). The Ray tasks also generate their candidate's answers to the
evaluation prompts; the coordinator embeds and scores them (the local executor does all of
it in the coordinator). On a machine with as many cores as workers, the local executor
already uses them all through PyTorch's threads, so the speed-up there measures
scheduling, not extra hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workers", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ns = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantisation bar

    import ray

    from crowdsft.config import load_coordinator_config
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.coordinator.server.scaffold import init_coordinator
    from crowdsft.coordinator.training.distributed import RayExecutor, WorkerModel
    from crowdsft.coordinator.training.space import build_llm_space
    from crowdsft.demo.crowd import make_crowd, target_set
    from crowdsft.demo.run import DemoSettings, _configure, _submit_direct, _write_jsonl

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    settings = DemoSettings(groups=4, seed=ns.seed)
    crowd = make_crowd(ns.seed, {k: 3 for k in ("expert-like", "noisy", "off-style", "spammer")})
    prompts = target_set(n_prompts=6, seed=ns.seed)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("local", "ray"):
            path = init_coordinator(Path(tmp) / name, listen="127.0.0.1:0", force=True)
            _configure(path, settings)
            _write_jsonl(path.parent / "target.jsonl", prompts)
            config = load_coordinator_config(path)
            with Coordinator(config) as coord:
                _submit_direct(crowd, coord, ns.seed)
                say(f"{name}: loading SmolLM2 and MiniLM in the coordinator ...")
                space = build_llm_space(config)
                executor = None
                startup = 0.0
                if name == "ray":
                    t0 = time.perf_counter()
                    ray.init(
                        address="local",
                        num_cpus=ns.workers,
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
                    executor = RayExecutor(
                        WorkerModel(config.model.base, config.model.device), num_cpus=1
                    )
                    startup = time.perf_counter() - t0
                runner = RoundRunner(config, coord.store, space, executor=executor)
                say(f"{name}: a round of 4 candidates ...")
                t0 = time.perf_counter()
                summary = runner.run()
                seconds = time.perf_counter() - t0
                nodes = len({p["node_id"] for p in executor.placements}) if executor else 0
                results[name] = {
                    "seconds": seconds,
                    "startup": startup,
                    "winner": summary.winner,
                    "scores": summary.scores,
                    "nodes": nodes,
                }
                say(f"  {seconds:.1f}s, winner {summary.winner}, scores {summary.scores}")
                if executor is not None:
                    executor.close()
                    ray.shutdown()
    local, remote = results["local"], results["ray"]
    out = {
        "local_seconds": round(local["seconds"], 1),
        "ray_seconds": round(remote["seconds"], 1),
        "ray_startup_seconds": round(remote["startup"], 1),
        "speedup": round(local["seconds"] / remote["seconds"], 2),
        "same_winner": local["winner"] == remote["winner"],
        "max_score_difference": max(
            abs(a - b) for a, b in zip(local["scores"], remote["scores"], strict=True)
        ),
        "ray_nodes_used": remote["nodes"],
        "ray_workers": ns.workers,
        "seed": ns.seed,
    }
    if ns.json:
        print(json.dumps(out, indent=1))
    else:
        print(
            f"round of 4 candidates, seed {ns.seed}: local {out['local_seconds']}s, ray "
            f"({ns.workers} one-CPU workers) {out['ray_seconds']}s, speed-up "
            f"{out['speedup']}x; Ray start-up {out['ray_startup_seconds']}s (not in the "
            f"round's time); same winner: {out['same_winner']} (largest score difference "
            f"{out['max_score_difference']:.2e}); Ray nodes used: {out['ray_nodes_used']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
