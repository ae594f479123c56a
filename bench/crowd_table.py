"""Print the crowd experiment's rows so far as a Markdown table (docs/results.md).

    python bench/crowd_table.py bench/results/crowd.jsonl

Reads the rows that ``crowdsft experiment crowd --out FILE`` appends (several files: the
rows of workers that ran different seeds), one line per (target, seed, bad fraction), in
target, seed and fraction order; a row that appears twice is shown once; then the
experiment's own means by bad fraction over these rows (``summarise``). The column "single-all,
the lineage's steps" is one fine-tune on everything with as many optimizer steps as the
tournament's lineage made (its steps against single-all's in brackets); rows from before
that arm show "–", or, given the file of ``bench/crowd_matched.py`` (which recovers the arm
for them from their recorded rounds), its figure marked with an asterisk:

    python bench/crowd_table.py bench/results/crowd.jsonl bench/results/crowd-matched.jsonl

Rows computed before ``rounds.judging_error`` defaulted to 0 (commit a5c5bf3) ran under the
paper's simulated 0.05 and do not record it; for each of them the script recomputes the
draws that the round engine made (``RoundRunner._rng(round_id, 2)`` from the row's rounds
seed) and names any round that a swap decided: such a row is not what the product gives
today, and is left out of the table and the means.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

ARM = ("single_all_matched", "lineage_steps", "single_all_steps")


def rows_of(paths: list[Path]) -> list[dict]:
    """The rows of ``paths``, each (target, seed, fraction) once; a file of
    ``bench/crowd_matched.py`` (lines marked ``replayed``) gives its matched-steps arm to the
    row of the same key, settings and tournament distance (the same run of the row) that
    lacks it, and the row is marked ``matched_replayed``."""
    seen: dict[tuple[str, int, float], dict] = {}
    replayed: dict[tuple[str, int, float, str], dict] = {}
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                key = (row["target"], row["seed"], row["bad_fraction"])
                if row.get("replayed"):
                    replayed.setdefault((*key, row["run_key"]), row)
                else:
                    seen.setdefault(key, row)
    for key, row in seen.items():
        arm = replayed.get((*key, row.get("run_key", "")))
        if (
            "single_all_matched" not in row
            and arm is not None
            and arm.get("tournament") == row["tournament"]  # the same run of the row
        ):
            row.update({k: arm[k] for k in ARM}, matched_replayed=True)
    return [seen[k] for k in sorted(seen)]


def swapped_rounds(row: dict) -> list[int]:
    """The rounds that the paper's 0.05 judging error decided in a row that ran under it
    (rows that record ``judging_error`` say so themselves, per round)."""
    import numpy as np

    from crowdsft.experiment.paper_llm import derived_seed

    if "judging_error" in row:
        return [r["round_id"] for r in row["rounds"] if r.get("swapped")]
    seed = derived_seed(row["target"], row["seed"], "rounds")
    return [
        r["round_id"]
        for r in row["rounds"]
        if r["updated"] and np.random.default_rng([seed, r["round_id"], 2]).random() < 0.05
    ]


def table(rows: list[dict]) -> list[str]:
    def auc(v: float | None) -> str:
        return "n/a" if v is None else f"{v:.2f}"

    def matched(r: dict) -> str:
        if "lineage_steps" not in r:
            return "–"  # a row from before this arm
        if r["single_all_matched"] is None:
            return "n/a"  # no round updated the model
        mark = "\\*" if r.get("matched_replayed") else ""
        return (
            f"{r['single_all_matched']:.3f}{mark} ({r['lineage_steps']} vs {r['single_all_steps']})"
        )

    out = [
        "| target | seed | bad | base | single-all | single-all, the lineage's steps "
        "| single-clean (oracle) | tournament | vs single-all | AUC rank / regression / credit |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        a = r["auc"]
        out.append(
            f"| {r['target']} | {r['seed']} | {round(r['bad_fraction'] * 100)}% | "
            f"{r['base']:.3f} | {r['single_all']:.3f} | {matched(r)} | {r['single_clean']:.3f} | "
            f"**{r['tournament']:.3f}** | {r['reduction_percent']:+.1f}% | "
            f"{auc(a.get('rank'))} / {auc(a.get('regression'))} / {auc(a.get('credit'))} |"
        )
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+", type=Path)
    args = parser.parse_args()
    rows = rows_of(args.files)
    swapped = {id(r): swapped_rounds(r) for r in rows}
    for r in rows:
        if swapped[id(r)]:
            print(
                f"left out: {r['target']} seed {r['seed']} at {r['bad_fraction']:.0%} bad, "
                f"round(s) {swapped[id(r)]} decided by a simulated judging error"
            )
    rows = [r for r in rows if not swapped[id(r)]]
    print("\n".join(table(rows)))
    print(f"\n{len(rows)} rows")
    # the experiment's own means by bad fraction, over the rows so far
    from crowdsft.experiment.crowd import summarise

    fractions = sorted({r["bad_fraction"] for r in rows})
    for f, b in summarise(rows, fractions)["by_fraction"].items():
        closed = b["room_closed"]
        aucs = ", ".join(
            f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in b["mean_auc"].items()
        )
        print(
            f"{float(f):.0%} bad ({b['target_seeds']} target-seeds): single-all "
            f"{b['single_all']:.3f}, single-clean {b['single_clean']:.3f}, tournament "
            f"{b['tournament']:.3f}; "
            + ("" if closed is None else f"room closed {closed:.0%}; ")
            + f"closer than single-all on {b['closer_than_single_all']}; mean AUC {aucs}"
        )
        m = b.get("matched_steps")
        if m:
            print(
                f"  against single-all with the lineage's steps ({m['target_seeds']} "
                f"target-seeds): {m['single_all_matched']:.3f} against the tournament's "
                f"{m['tournament']:.3f}; closer on {m['closer_than_single_all_matched']}"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
