"""The paper's simulation, measured: speed of the full sweep, faithfulness of the
reproduction, accuracy of the paper's KernelSHAP, and the regression reward against rank.

    python bench/simulation.py [--part all|sweep|kernelshap|regression] [--runs 50]
                               [--out bench/out/simulation]

* sweep: the full paper grid (5 user counts x 4 group counts x 3 groupings x 3 evaluations,
  50 runs of 100 rounds, rank reward), with Shapley values converged to a standard error
  below 1% of their spread (stratified permutation sampling), timed end to end on all CPUs;
  writes summary.csv and the plots, and checks the paper's trends on the result.
* kernelshap: the same grid valued with the paper's KernelSHAP (10,000 samples); how far its
  estimates are from the converged values, and what that does to the correlations.
* regression: rank versus regression reward at 100 users and 4 groups, every grouping and
  evaluation, 50 runs each: mean Pearson(points, Shapley) and mean final distance; also
  epsilon-greedy with jittered tiers (``jitter`` 1.5, chosen on seed 1 with 20 runs, l2;
  reported here on seed 0), which lets the regression reward tell tier-mates apart.
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from crowdsft.simulation.game import (
    Cell,
    default_data_dir,
    expert_of,
    load_movielens,
    population,
    run_cell,
    shapley_values,
    sweep,
    write_plots,
    write_summary,
)
from crowdsft.stats import pearson

USERS = (10, 25, 50, 75, 100)
GROUPS = (2, 3, 4, 5)
GROUPINGS = ("random", "epsilon-greedy", "interleaved")
JITTER = 1.5  # epsilon-greedy tiers' jitter for the regression part (chosen on seed 1)
EVALUATIONS = ("l2", "l1", "dot")


def grid(runs: int, valuation: str, reward: str = "rank") -> list[Cell]:
    return [
        Cell(
            users=u,
            groups=g,
            grouping=gr,
            evaluation=ev,
            reward=reward,
            valuation=valuation,
            runs=runs,
        )
        for u in USERS
        for g in GROUPS
        for gr in GROUPINGS
        for ev in EVALUATIONS
    ]


def by(results, key):
    out = defaultdict(list)
    for r in results:
        out[key(r.cell)].append(r.summary())
    return out


def mean(rows, field):
    vals = [row[field] for row in rows if not np.isnan(row[field])]
    return statistics.fmean(vals) if vals else float("nan")


def trends(results, label: str) -> None:
    users = by(results, lambda c: c.users)
    pearson_by_users = [mean(users[u], "mean_pearson") for u in USERS]
    shown = {u: round(float(p), 3) for u, p in zip(USERS, pearson_by_users, strict=True)}
    print(f"  [{label}] mean Pearson by users {shown}")
    falls = all(a > b for a, b in itertools.pairwise(pearson_by_users))
    groups = by(results, lambda c: c.groups)
    print(
        f"  [{label}] mean Pearson by groups "
        f"{ {g: round(mean(groups[g], 'mean_pearson'), 3) for g in GROUPS} }"
    )
    combos = by(results, lambda c: (c.grouping, c.evaluation))
    for (gr, ev), rows in sorted(combos.items()):
        print(
            f"  [{label}] {gr:15} {ev:4} Pearson {mean(rows, 'mean_pearson'):.3f}  "
            f"final distance {mean(rows, 'mean_final_distance'):.3f}  "
            f"rounds to 5 {mean(rows, 'mean_rounds_to_5'):.1f}"
        )
    grp = by(results, lambda c: c.grouping)
    p = {g: mean(grp[g], "mean_pearson") for g in GROUPINGS}
    d = {g: mean(grp[g], "mean_final_distance") for g in GROUPINGS}
    ev = by(results, lambda c: c.evaluation)
    dist_ev = {e: mean(ev[e], "mean_final_distance") for e in EVALUATIONS}
    print(f"  [{label}] trend: Pearson falls as users grow: {'yes' if falls else 'NO'}")
    fairer = p["random"] > p["epsilon-greedy"] and p["interleaved"] > p["epsilon-greedy"]
    print(
        f"  [{label}] trend: random and interleaved fairer than epsilon-greedy: "
        f"{'yes' if fairer else 'NO'} ({', '.join(f'{k} {v:.3f}' for k, v in p.items())})"
    )
    closer = d["epsilon-greedy"] < min(d["random"], d["interleaved"])
    print(
        f"  [{label}] trend: epsilon-greedy converges closest: {'yes' if closer else 'NO'} "
        f"({', '.join(f'{k} {v:.3f}' for k, v in d.items())})"
    )
    worst = max(dist_ev, key=dist_ev.get)
    print(
        f"  [{label}] trend: dot product converges worst: {'yes' if worst == 'dot' else 'NO'} "
        f"({', '.join(f'{k} {v:.3f}' for k, v in dist_ev.items())})"
    )


def part_sweep(runs: int, out: Path, data: Path):
    cells = grid(runs, "permutation")
    t0 = time.perf_counter()
    results = sweep(cells, data)
    elapsed = time.perf_counter() - t0
    write_summary(results, out / "summary.csv")
    write_plots(results, out)
    print(
        f"full sweep: {len(cells)} cells x {runs} runs x 100 rounds, converged Shapley values, "
        f"{os.cpu_count()} CPUs: {elapsed:.1f}s (target < 120s: "
        f"{'met' if elapsed < 120 else 'NOT met'})"
    )
    print(f"  wrote {out / 'summary.csv'} and plots")
    trends(results, "converged")
    return results


def part_kernelshap(runs: int, out: Path, data: Path, converged=None):
    t0 = time.perf_counter()
    ks_results = sweep(grid(runs, "kernelshap"), data)
    print(f"kernelshap sweep: {time.perf_counter() - t0:.1f}s")
    write_summary(ks_results, out / "summary_kernelshap.csv")
    trends(ks_results, "kernelshap")
    # Estimator accuracy, game by game (one expert per run, as in the sweep).
    ml = load_movielens(data)
    print("  KernelSHAP (10,000 samples) against converged permutation values, per game:")
    for ev in EVALUATIONS:
        for u in USERS:
            vectors = population(ml, u)
            experts = sorted({expert_of(0, u, r) for r in range(min(runs, 20))})
            corr, maxerr, meanerr = [], [], []
            for e in experts:
                ref = shapley_values(vectors, e, ev, "permutation", 0)
                ks = shapley_values(vectors, e, ev, "kernelshap", 0)
                spread = np.ptp(ref)
                corr.append(pearson(ks, ref))
                maxerr.append(np.abs(ks - ref).max() / spread)
                meanerr.append(np.abs(ks - ref).mean() / spread)
            print(
                f"    {ev:4} {u:3} users: Pearson(KernelSHAP, converged) "
                f"{np.mean(corr):.3f}, mean |error| {np.mean(meanerr):.1%} of the spread, "
                f"max {np.mean(maxerr):.1%}"
            )
    if converged is not None:
        a = by(converged, lambda c: c.users)
        b = by(ks_results, lambda c: c.users)
        print("  mean Pearson(points, Shapley) with converged values vs with KernelSHAP:")
        for u in USERS:
            print(
                f"    {u:3} users: {mean(a[u], 'mean_pearson'):.3f} vs "
                f"{mean(b[u], 'mean_pearson'):.3f}"
            )


def part_regression(runs: int, data: Path):
    print(
        "rank vs regression reward, 100 users, 4 groups, "
        f"{runs} runs each (Pearson with converged Shapley values; final distance):"
    )
    ok = True
    variants = [(g, g, None) for g in GROUPINGS] + [
        ("eps-greedy+jitter", "epsilon-greedy", {"grouping": {"jitter": JITTER}})
    ]
    for ev in EVALUATIONS:
        shap: dict[int, np.ndarray] = {}
        for label, gr, opts in variants:
            rows = {}
            for reward in ("rank", "regression"):  # both share the Shapley values
                cell = Cell(
                    users=100, groups=4, grouping=gr, evaluation=ev, reward=reward, runs=runs
                )
                rows[reward] = run_cell(cell, data, shap, opts).summary()
            rk, rg = rows["rank"], rows["regression"]
            better = rg["mean_final_distance"] <= rk["mean_final_distance"]
            met = rg["mean_pearson"] >= 0.95 and better
            ok &= met
            print(
                f"  {label:17} {ev:4} rank: P {rk['mean_pearson']:.3f} D "
                f"{rk['mean_final_distance']:.3f} | regression: P {rg['mean_pearson']:.3f} D "
                f"{rg['mean_final_distance']:.3f}  {'met' if met else 'NOT met'}"
            )
    print(f"  target (Pearson >= 0.95 and distance no worse than rank) met in every cell: {ok}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", default="all", choices=("all", "sweep", "kernelshap", "regression"))
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--out", type=Path, default=Path("bench/out/simulation"))
    ap.add_argument("--data", type=Path, default=None)
    ns = ap.parse_args()
    data = ns.data or default_data_dir()
    ns.out.mkdir(parents=True, exist_ok=True)
    converged = None
    if ns.part in ("all", "sweep"):
        converged = part_sweep(ns.runs, ns.out, data)
    if ns.part in ("all", "kernelshap"):
        part_kernelshap(ns.runs, ns.out, data, converged)
    if ns.part in ("all", "regression"):
        part_regression(ns.runs, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
