"""Valuations on the LLM path, cross-checked on a small crowd: exact retraining Shapley
values (every coalition of the 8 contributors fine-tuned from the base once: 255 LoRA
fine-tunes) against truncated Monte Carlo on the same game (TMC-Shapley), the in-run credit
(one training run on everybody's data), and the embedding-game proxy that the report used
(the mean embedding of a coalition's responses against the target's, no model involved).
Prints Pearson and Spearman between every pair and each estimator's cost.

    python bench/llm_valuation.py [--seed 0] [--permutations 16] [--truncation 0.05]
                                  [--per-kind 2] [--dtype auto] [--quick] [--json FILE]

The crowd is the demo's (``crowdsft.demo.crowd``): 2 contributors of each kind (expert-like,
noisy, off-style, spammer), 8 examples each; the training settings are the demo's (LoRA on
q/k/v/o of the last 8 layers, 6 steps of 8 examples, learning rate 0.01); a coalition's value
is its fine-tune's mean per-prompt score (minus the L2 distance in the MiniLM space) on 6
held-out prompts (the demo's reported set), greedy answers of at most 32 tokens. ``--quick``:
a tiny random model and a bag-of-characters embedder, to check the machinery in a minute
(its figures mean nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--permutations", type=int, default=16, help="TMC permutations")
    ap.add_argument("--truncation", type=float, default=0.05, help="TMC tolerance")
    ap.add_argument("--per-kind", type=int, default=2, help="contributors of each kind")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument(
        "--dtype",
        default="auto",
        choices=("auto", "float32", "bfloat16"),
        help="auto: bfloat16 on CUDA or a CPU with native bf16, else float32",
    )
    ap.add_argument("--json", type=Path, default=None)
    ns = ap.parse_args()

    from crowdsft.config import TrainingConfig
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.coordinator.training.space import GenerationConfig
    from crowdsft.coordinator.training.valuation import (
        InRunCredit,
        RetrainingGame,
        credit_by_owner,
    )
    from crowdsft.demo.crowd import make_crowd, target_set
    from crowdsft.demo.run import SELECTION_PROMPTS
    from crowdsft.plugins.evaluation import L2
    from crowdsft.plugins.manager import get_plugins
    from crowdsft.plugins.valuation import (
        CentroidGame,
        ExactShapley,
        MaxPermutations,
        PermutationShapley,
    )
    from crowdsft.stats import pearson, spearman

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    started = time.monotonic()
    kinds = ("expert-like", "noisy", "off-style", "spammer")
    crowd = make_crowd(ns.seed, counts={k: ns.per_kind for k in kinds})
    held_out = target_set(n_prompts=2 * SELECTION_PROMPTS, seed=ns.seed)[SELECTION_PROMPTS:]
    if ns.quick:
        from crowdsft.testing.tiny import CharEmbedder, tiny_model

        model, tokenizer = tiny_model(seed=ns.seed)
        embedder: object = CharEmbedder()
    else:
        dev, _ = llm.device_and_dtype("auto")
        dtype = llm.resolve_dtype(dev, ns.dtype)
        say(f"loading smollm2 and minilm on {dev} ({dtype})")
        model, tokenizer = llm.load_base_model("smollm2", dev, dtype)
        embedder = get_plugins().create("embedder", "minilm", device=str(dev))
    training = TrainingConfig(
        rank=8,
        alpha=16,
        target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
        layers=8,
        learning_rate=1e-2,
        epochs=100,
        max_steps=6,
        batch_size=8,
        max_length=96,
        seed=ns.seed,
    )
    generation = GenerationConfig(max_new_tokens=8 if ns.quick else 32, batch_size=6)

    def new_game() -> RetrainingGame:
        return RetrainingGame(
            model,
            tokenizer,
            embedder,
            [c.examples for c in crowd],
            [{"prompt": p["prompt"]} for p in held_out],
            [p["response"] for p in held_out],
            L2(),
            training,
            generation,
            seed=ns.seed,
            say=say,
        )

    n = len(crowd)
    rows: dict[str, dict] = {}
    # TMC first, on a fresh cache: its own cost.
    game = new_game()
    tmc = PermutationShapley(
        MaxPermutations(ns.permutations),
        batch=ns.permutations,
        truncation=ns.truncation,
        stratified=False,
    )(game, np.random.default_rng(ns.seed))
    rows["tmc"] = {
        "values": tmc.values,
        "stderr": tmc.stderr,
        "fine_tunes": game.fits,
        "seconds": game.seconds,
    }
    # Exact on the same game: the coalitions TMC fine-tuned are reused; its cost is all of
    # them (2^n - 1 fine-tunes), timed as the mean per coalition valued times that count.
    exact = ExactShapley()(game)
    per = game.seconds / max(len(game.cache), 1)
    rows["exact"] = {
        "values": exact.values,
        "stderr": exact.stderr,
        "fine_tunes": 2**n - 1,
        "seconds": per * 2**n,
    }
    # In-run: one training run on everybody's data, credited as it goes; plain training
    # of the same run beside it for the overhead.
    examples = [e for c in crowd for e in c.examples]
    owners = [i for i, c in enumerate(crowd) for _ in c.examples]
    t0 = time.monotonic()
    llm.fit(model, tokenizer, examples, None, training)
    plain_s = time.monotonic() - t0
    credit = InRunCredit(held_out)
    t0 = time.monotonic()
    llm.fit(model, tokenizer, examples, None, training, credit=credit)
    credited_s = time.monotonic() - t0
    rows["in-run"] = {
        "values": credit_by_owner(credit.credit, owners, n),
        "stderr": np.zeros(n),
        "fine_tunes": 1,
        "seconds": credited_s,
        "plain_training_seconds": plain_s,
    }
    # The embedding-game proxy: no model at all.
    t0 = time.monotonic()
    vectors = np.stack(
        [np.asarray(embedder.embed([e["response"] for e in c.examples])).mean(0) for c in crowd]
    )
    target = np.asarray(embedder.embed([p["response"] for p in held_out])).mean(0)
    proxy = ExactShapley()(CentroidGame(vectors, target, L2()))
    rows["proxy"] = {
        "values": proxy.values,
        "stderr": proxy.stderr,
        "fine_tunes": 0,
        "seconds": time.monotonic() - t0,
    }

    names = list(rows)
    print(f"{n} contributors: " + ", ".join(c.name for c in crowd))
    print(f"{'estimator':<10}{'fine-tunes':>11}{'seconds':>9}  values")
    for k in names:
        r = rows[k]
        vals = " ".join(f"{v:+.4f}" for v in r["values"])
        print(f"{k:<10}{r['fine_tunes']:>11}{r['seconds']:>9.0f}  {vals}")
    print("Pearson / Spearman between estimators:")
    pairs = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            p = pearson(rows[a]["values"], rows[b]["values"])
            s = spearman(rows[a]["values"], rows[b]["values"])
            pairs[f"{a}~{b}"] = {"pearson": p, "spearman": s}
            print(f"  {a:>7} ~ {b:<7} {p:+.3f} / {s:+.3f}")
    print(
        f"in-run overhead: {credited_s:.1f}s credited vs {plain_s:.1f}s plain training "
        f"({credited_s / plain_s:.2f}x); total {time.monotonic() - started:.0f}s"
    )
    if ns.json:
        ns.json.write_text(
            json.dumps(
                {
                    "contributors": [{"name": c.name, "kind": c.kind} for c in crowd],
                    "estimators": {
                        k: {
                            kk: (vv.tolist() if isinstance(vv, np.ndarray) else vv)
                            for kk, vv in r.items()
                        }
                        for k, r in rows.items()
                    },
                    "pairs": pairs,
                    "seed": ns.seed,
                    "quick": ns.quick,
                    "dtype": "quick" if ns.quick else str(dtype).removeprefix("torch."),
                    "seconds": round(time.monotonic() - started, 1),
                },
                indent=1,
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
