"""The crowd experiment's matched-steps arm for rows computed before it existed.

    python bench/crowd_matched.py bench/results/crowd.jsonl --out bench/results/crowd-matched.jsonl

(several row files may be given: the rows of workers that ran different seeds).

``single_all_matched`` (one fine-tune on everything with as many optimizer steps as the
tournament's lineage made) came in at commit 416e39f; the rows before it lack it. It needs
only the lineage's step count, and the lineage follows from the row's recorded rounds: this
script submits the row's crowd to a fresh coordinator of the same settings and runs its
rounds with the product's ``RoundRunner`` over a model space that trains nothing and takes
every score from the row (``crowd.Replayed``), checks that the replayed rounds make the
recorded decisions (each group's bad members, winners, updates), counts the steps the
installed candidates would train, and then runs the arm itself: the same fine-tune, from the
same derived seeds, that a rerun of the whole row would make. Each result is appended to
``--out`` as it finishes (``--out`` is also the resume file), with the row's tournament
distance to tell which run of the row it belongs to; ``bench/crowd_table.py`` and the
experiment's means take the arm from there for the rows that lack it. The replay also checks
each rule's mean points of honest and bad contributors against the row's (they pin who was
in which group) and replays the row's judging error (the paper's 0.05 for rows that do not
record it).

``--check N``: first do the same for up to N rows that do record the arm, and stop with an
error unless the replay gives their recorded steps and the arm their recorded distance
exactly (run it on the same kind of machine and thread count as the rows).

Only rows with this code's ``run_key`` settings are taken (the settings, model, data and
dtype of the default ``crowdsft experiment crowd``); others are skipped with a word.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("rows", nargs="+", type=Path, help="crowd experiment JSONL files")
    ap.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "paper-llm")
    ap.add_argument("--out", type=Path, required=True, help="append results; resume from it")
    ap.add_argument("--check", type=int, default=0, help="first reproduce N recorded arms")
    ap.add_argument("--limit", type=int, default=None, help="at most this many new rows")
    args = ap.parse_args(argv)

    from crowdsft.experiment import data as paper
    from crowdsft.experiment.crowd import CrowdExperiment, CrowdSettings, load_models, run_key
    from crowdsft.experiment.paper_llm import device_and_precision

    sys.path.insert(0, str(ROOT / "bench"))
    from crowd_table import rows_of

    settings = CrowdSettings()
    records = paper.load(args.data)
    dev, dtype = device_and_precision("auto", "auto")
    precision = str(dtype).removeprefix("torch.")
    key = run_key(settings, "smollm2", records.digest(), precision, False)
    rows = rows_of(args.rows)
    mine = [r for r in rows if r.get("run_key") == key]
    if len(mine) < len(rows):
        print(f"skipping {len(rows) - len(mine)} row(s) of other settings (run_key != {key})")

    def ident(r: dict) -> tuple:  # a row, and which run of it (a rerun ends elsewhere)
        return (r["target"], r["seed"], r["bad_fraction"], r["run_key"], r["tournament"])

    done = set()
    if args.out.exists():
        for line in args.out.read_text(encoding="utf-8").splitlines():
            if line.strip():
                done.add(ident(json.loads(line)))
    todo = [r for r in mine if "single_all_matched" not in r and ident(r) not in done]
    if args.limit is not None:
        todo = todo[: args.limit]
    checks = [
        r for r in mine if r.get("single_all_matched") is not None and not r.get("matched_replayed")
    ][: args.check]
    elsewhere = {r.get("device") for r in todo + checks} - {str(dev)}
    if elsewhere:
        print(
            f"note: rows computed on {sorted(elsewhere)}, this runs on {dev}: the arm's "
            "figures may differ in the last digits from a rerun there"
        )
    print(f"{len(todo)} row(s) to give the arm, {len(checks)} recorded one(s) to reproduce first")
    if not todo and not checks:
        return 0

    print(f"loading smollm2 on {dev} ({precision}) and the embedders", flush=True)
    experiment = CrowdExperiment(
        records,
        *load_models("smollm2", dev, dtype),
        settings,
        say=lambda s: None,
    )

    def name(r: dict) -> str:
        return f"{r['target']} seed {r['seed']} at {r['bad_fraction']:.0%} bad"

    for r in checks:
        got = experiment.matched_arm(r)
        same = (got["lineage_steps"], got["single_all_matched"]) == (
            r["lineage_steps"],
            r["single_all_matched"],
        )
        print(
            f"check {name(r)}: steps {got['lineage_steps']} (recorded {r['lineage_steps']}), "
            f"matched {got['single_all_matched']!r} (recorded {r['single_all_matched']!r}): "
            f"{'same' if same else 'DIFFERENT'} ({got['seconds']:.0f}s)",
            flush=True,
        )
        if not same:
            return 1
    started = time.monotonic()
    for i, r in enumerate(todo, 1):
        got = experiment.matched_arm(r) | {
            "run_key": key,
            "tournament": r["tournament"],  # which run of the row the arm belongs to
            "device": str(dev),
            "replayed": True,
        }
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(got) + "\n")
        m = got["single_all_matched"]
        print(
            f"[{i}/{len(todo)}] {name(r)}: {got['lineage_steps']} steps (single-all "
            f"{got['single_all_steps']}): {'no update' if m is None else f'{m:.4f}'}, "
            f"tournament {r['tournament']:.4f} ({got['seconds']:.0f}s; "
            f"{time.monotonic() - started:.0f}s in all)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
