"""Points against grounded values on the LLM path: the demo's crowd and rounds (SmolLM2,
MiniLM), once per reward rule and seed, in process (no gRPC nodes: the figures are the
same, the nodes only add start-up time). For each run it prints Pearson and Spearman
between the points the rule awarded and the contributors' grounded values: their in-run
credit over the winning lineage, measured on the held-out prompts that no choice saw (the
``credit`` rule pays from the credit against the selection prompts). Beside them, the
embedding-game proxy's Pearson and the held-out reduction against the single model.

    python bench/llm_points.py [--rewards rank regression credit] [--seeds 0 1 2]
                               [--jsonl FILE]

A run takes about 4 minutes on 2 CPU cores. With ``--jsonl``, every run appends a row as
it finishes, and runs already in the file (same reward and seed) are skipped: an
interrupted sweep resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rewards", nargs="+", default=["rank", "regression", "credit"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--jsonl", type=Path, default=None, help="append rows; resume from it")
    ns = ap.parse_args()

    from crowdsft.demo.run import DemoSettings, run_demo

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    done: dict[tuple[str, int], dict] = {}
    if ns.jsonl is not None and ns.jsonl.exists():
        for line in ns.jsonl.read_text().splitlines():
            if line.strip():
                row = json.loads(line)
                done[(row["reward"], row["seed"])] = row
    rows = []
    for seed in ns.seeds:
        for reward in ns.rewards:
            if (reward, seed) in done:
                rows.append(done[(reward, seed)])
                continue
            say(f"== reward {reward}, seed {seed}")
            with tempfile.TemporaryDirectory() as tmp:
                result = run_demo(
                    Path(tmp), DemoSettings(reward=reward, seed=seed), say, via_grpc=False
                )
            row = {
                "reward": reward,
                "seed": seed,
                "pearson_points_grounded": result["pearson_points_grounded"],
                "spearman_points_grounded": result["spearman_points_grounded"],
                "grounded_on": result["grounded_on"],
                "pearson_points_shapley": result["pearson_points_shapley"],
                "reduction_percent": result["reduction_percent"],
                "mean_points_by_kind": result["mean_points_by_kind"],
                "seconds": result["seconds"],
            }
            rows.append(row)
            if ns.jsonl is not None:
                with ns.jsonl.open("a") as f:
                    f.write(json.dumps(row) + "\n")

    def fmt(x: float | None) -> str:
        return "   n/a" if x is None or math.isnan(x) else f"{x:+.3f}"

    print(
        f"{'reward':<12}{'seed':>5}{'P grounded':>12}{'S grounded':>12}{'P proxy':>9}"
        f"{'reduction':>11}{'seconds':>9}"
    )
    for r in rows:
        print(
            f"{r['reward']:<12}{r['seed']:>5}{fmt(r['pearson_points_grounded']):>12}"
            f"{fmt(r['spearman_points_grounded']):>12}{fmt(r['pearson_points_shapley']):>9}"
            f"{r['reduction_percent']:>10.1f}%{r['seconds']:>9.0f}"
        )
    print("mean over seeds (Pearson with the held-out grounded values, ± sd):")
    for reward in ns.rewards:
        vals = [
            r["pearson_points_grounded"]
            for r in rows
            if r["reward"] == reward and r["pearson_points_grounded"] is not None
        ]
        if vals:
            sd = float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0
            print(f"  {reward:<12}{np.mean(vals):+.3f} ± {sd:.3f} over {len(vals)} seeds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
