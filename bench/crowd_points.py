"""How other accountings of the ``rank`` reward would separate honest from bad contributors,
on recorded crowd rows, without training anything.

    python bench/crowd_points.py bench/results/crowd-tuning.jsonl

The crowd experiment's ``rank`` reward pays each group by its rank in every updated round it
plays, and a group that wins is consumed: its members play no later round. Does that
explain the low AUC of ``rank`` (the chance that an honest contributor holds more points than
a bad one)? For each row with bad contributors this replays the row's rounds
(``CrowdExperiment.replay``: the same crowd and settings through the product's round engine,
every score taken from the row, its decisions and each rule's points checked against the
row's) and computes, from the replayed ledger, the AUC of:

- ``rank``: the points as the product awards them (the row's own AUC, recomputed);
- ``per round played``: the rank points earned divided by the rounds a contributor played
  (consumption no longer costs points);
- ``royalty``: rank, plus, for a consumed contributor, the winners' points in every later
  updated round (its data is in every later model).

Meant for the tuning rows (``bench/results/crowd-tuning.jsonl``: caring and sadness, seed
1000): a choice of reward made on the evidence rows would not be held out. Rows are replayed
under the reward and ``consolidate_every`` they record.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def accountings(records: list[dict], population: list[str]) -> dict[str, dict[str, float]]:
    """Each accounting's points per contributor from a replayed ledger's records."""
    from crowdsft.tournament import DecidedRound

    rank = dict.fromkeys(population, 1.0)
    earned = dict.fromkeys(population, 0.0)
    played = dict.fromkeys(population, 0)
    royalty = dict.fromkeys(population, 1.0)
    consumed: set[str] = set()
    for rec in records:
        d = DecidedRound.from_record(rec)
        n_groups = len(d.groups)
        here = {n for g in d.groups for n in g}
        for n in here:
            played[n] += 1
        if not d.updated:
            continue
        order = [g for g in d.ranking if g < n_groups]  # the groups, best first
        for r, g in enumerate(order):
            for n in d.groups[g]:
                rank[n] += n_groups - r
                earned[n] += n_groups - r
                royalty[n] += n_groups - r
        for n in consumed - here:
            royalty[n] += n_groups
        if order and order[0] == d.ranking[0]:  # a group won: its members are consumed
            consumed |= set(d.groups[order[0]])
    per_round = {n: earned[n] / played[n] if played[n] else 0.0 for n in population}
    return {"rank": rank, "per round played": per_round, "royalty": royalty}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", type=Path, help="crowd experiment JSONL files")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper-llm")
    args = ap.parse_args(argv)

    from crowdsft.experiment import data as paper
    from crowdsft.experiment.crowd import CrowdExperiment, CrowdSettings, auc, load_models
    from crowdsft.experiment.paper_llm import device_and_precision

    rows = []
    for path in args.rows:
        rows += [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]
    rows = [r for r in rows if r["bad"] > 0]
    if not rows:
        print("no row with bad contributors")
        return 0
    records = paper.load(args.data)
    dev, dtype = device_and_precision("auto", "auto")
    experiment = CrowdExperiment(
        records,
        *load_models("smollm2", dev, dtype),
        CrowdSettings(),
        say=lambda s: None,
    )
    names = ("rank", "per round played", "royalty")
    print("| target | seed | bad | consolidate_every | " + " | ".join(names) + " |")
    print("| --- | --- | --- | --- | " + " | ".join("---" for _ in names) + " |")
    for row in rows:
        experiment.settings = dataclasses.replace(
            CrowdSettings(),
            reward=row.get("reward"),
            consolidate_every=row.get("consolidate_every"),
        )
        replay = experiment.replay(row)
        population = list(replay.records[-1]["population"])
        points = accountings(replay.records, population)
        aucs = {
            k: auc([p.get(n, 1.0) for n in replay.honest], [p.get(n, 1.0) for n in replay.bad])
            for k, p in points.items()
        }
        if abs(aucs["rank"] - row["auc"]["rank"]) > 1e-9:
            raise SystemExit(f"the replayed rank AUC {aucs['rank']} is not the row's")
        print(
            f"| {row['target']} | {row['seed']} | {row['bad_fraction']:.0%} | "
            f"{row.get('consolidate_every')} | "
            + " | ".join(f"{aucs[k]:.3f}" for k in names)
            + " |",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
