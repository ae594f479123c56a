"""The paper's LLM experiment (``crowdsft experiment paper-llm``) as a benchmark: prints the
per-target table, the summary, the device and the time per target-seed.

    python bench/paper_llm.py --data ../shared/data/paper-llm [--targets 8] [--seeds 3]
        [--device auto|cpu|cuda] [--dtype auto|float32|bfloat16] [--json FILE]
        [--out ROWS.jsonl [--resume]]

Same code and defaults as the command; the model runs in bf16 on a GPU and on a CPU with
native bf16 (``--dtype auto``), float32 elsewhere.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/paper-llm"))
    ap.add_argument("--targets", default=None, help="names, or N spread over the 28")
    ap.add_argument("--seeds", type=int, default=1)
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--answers", type=int, default=50)
    ap.add_argument("--json", type=Path, default=None, help="also write the result here")
    ap.add_argument("--out", type=Path, default=None, help="append each row here as it ends")
    ap.add_argument("--resume", action="store_true", help="reuse the rows already in --out")
    ns = ap.parse_args()
    if ns.resume and ns.out is None:
        ap.error("--resume needs --out")

    from crowdsft.experiment import data as paper_data
    from crowdsft.experiment.paper_llm import (
        PaperSettings,
        device_and_precision,
        read_done,
        run,
        run_key,
        table,
    )

    records = paper_data.load(ns.data)
    targets = paper_data.select_targets(records, ns.targets)
    settings = PaperSettings(answers=ns.answers)
    done = {}
    if ns.resume:
        precision = str(device_and_precision(ns.device, ns.dtype)[1]).removeprefix("torch.")
        key = run_key(settings, "smollm2", "goemotions", records.digest(), False, precision)
        done, _ = read_done(ns.out, key)

    def on_row(row: dict) -> None:
        if ns.out is not None:
            with open(ns.out, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")

    result = run(
        records,
        targets,
        list(range(ns.first_seed, ns.first_seed + ns.seeds)),
        settings,
        device=ns.device,
        dtype=ns.dtype,
        say=lambda line: print(line, file=sys.stderr, flush=True),
        on_row=on_row,
        done=done,
    )
    for line in table(result):
        print(line)
    per = [r["seconds"] for r in result["targets"]]
    print(
        f"time per target-seed: mean {statistics.fmean(per):.0f}s, max {max(per):.0f}s "
        f"({result['device']}, {result['dtype']})"
    )
    if ns.json:
        ns.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
