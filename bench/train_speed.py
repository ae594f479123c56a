"""Training and generation speed on real pool comments, before and after, in one run.

    python bench/train_speed.py [--data ../shared/data/paper-llm] [--target joy]
        [--batch-sizes 4 8] [--layers 8 0] [--epochs 1] [--repeats 3] [--json FILE]

Training: one epoch of LoRA (rank 8, the experiments' settings: ``max_length`` 96, learning
rate 1e-3) over the target's 100 pool comments, the user turn ``write a reddit comment.``,
SmolLM2-135M in the precision the experiments use (bf16 on a CPU with native bf16), per
batch size and LoRA depth (``--layers 0``: every layer). *before*: each batch right-padded
(``pack=False``); *after*: each batch one packed row, the shared chat template once
(``pack=True``). Tokens/s counts the examples' own tokens (the same in both), so the ratio is
the speed-up on the same training; the first losses of both are printed beside it.

Generation: 50 sampled answers of up to 20 tokens to the one prompt (what the experiments
sample per model). *before*: transformers' ``generate`` as the project called it until now
(padded batch, ``multinomial`` sampling); *after*: ``lora.generate`` (its own decoding loop,
the prompt read once and its cache copied to every row, one uniform draw per token).
Tokens/s counts the answers' tokens up to their end.

Paths alternate within each repeat, and the median of the repeats is reported, so that
whatever else the machine does weighs on both alike; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


def reference_generate(model, tokenizer, prompts, max_new_tokens, seed, temperature):
    """The generation path this project used before (transformers' generate)."""
    import torch

    from crowdsft.coordinator.training import lora as llm

    torch.manual_seed(seed)
    texts = [llm.prompt_text(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    head = model.get_output_embeddings()
    hook = head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
    try:
        with torch.no_grad():
            ids = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                do_sample=True,
                temperature=temperature,
                top_p=1.0,
                top_k=0,
            )
    finally:
        hook.remove()
    new = ids[:, enc["input_ids"].shape[1] :]
    return [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=Path("../shared/data/paper-llm"))
    ap.add_argument("--target", default="joy")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[4, 8])
    ap.add_argument("--layers", type=int, nargs="+", default=[8, 0], help="0: every layer")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument(
        "--epochs", type=int, default=1, help="per fit (3: what --schedule paper gives single-100)"
    )
    ap.add_argument("--learning-rate", type=float, default=1e-3)
    ap.add_argument("--answers", type=int, default=50)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"])
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ns = ap.parse_args()

    import torch

    from crowdsft.config import TrainingConfig
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.experiment import data as paper_data
    from crowdsft.experiment.paper_llm import device_and_precision

    records = paper_data.load(ns.data)
    examples = [{"prompt": paper_data.PROMPT, "response": p.text} for p in records.pool(ns.target)]
    device, dtype = device_and_precision("cpu", ns.dtype)
    print(f"loading SmolLM2-135M-Instruct ({str(dtype).removeprefix('torch.')})", file=sys.stderr)
    model, tokenizer = llm.load_base_model("smollm2", device, dtype)
    torch.set_num_threads(torch.get_num_threads())
    out: dict = {
        "device": "cpu",
        "dtype": str(dtype).removeprefix("torch."),
        "threads": torch.get_num_threads(),
        "target": ns.target,
        "examples": len(examples),
        "repeats": ns.repeats,
        "epochs": ns.epochs,
        "learning_rate": ns.learning_rate,
        "training": [],
        "generation": {},
    }

    print(f"training: {ns.epochs} epoch(s) over {len(examples)} {ns.target} pool comments, rank 8")
    print(
        f"{'layers':>7}{'batch':>6}{'before tok/s':>14}{'after tok/s':>13}{'speed-up':>10}"
        f"{'first loss before/after':>26}"
    )
    for layers in ns.layers:
        for batch in ns.batch_sizes:
            cfg = TrainingConfig(
                rank=8,
                alpha=16,
                learning_rate=ns.learning_rate,
                epochs=ns.epochs,
                batch_size=batch,
                max_length=96,
                layers=layers or None,
                seed=0,
            )
            llm.fit(model, tokenizer, examples[:batch], None, cfg)  # warm-up
            times: dict[bool, list[float]] = {False: [], True: []}
            runs = {}
            for _ in range(ns.repeats):
                for pack in (False, True):
                    t = time.perf_counter()
                    runs[pack] = llm.fit(model, tokenizer, examples, None, cfg, pack=pack)
                    times[pack].append(time.perf_counter() - t)
            tokens = runs[True].tokens
            before = tokens / statistics.median(times[False])
            after = tokens / statistics.median(times[True])
            row = {
                "layers": layers or "all",
                "batch_size": batch,
                "tokens": tokens,
                "steps": runs[True].steps,
                "before_tokens_per_s": round(before, 1),
                "after_tokens_per_s": round(after, 1),
                "speedup": round(after / before, 2),
                "before_losses": runs[False].losses[:3],
                "after_losses": runs[True].losses[:3],
                "seconds": {"before": times[False], "after": times[True]},
            }
            out["training"].append(row)
            print(
                f"{row['layers']!s:>7}{batch:>6}{before:>14.0f}{after:>13.0f}"
                f"{after / before:>9.2f}x{runs[False].losses[0]:>13.4f} / "
                f"{runs[True].losses[0]:.4f}"
            )

    prompts = [{"prompt": paper_data.PROMPT}] * ns.answers
    gen = {"before": [], "after": []}
    counts = {}
    for r in range(ns.repeats):
        for name in ("before", "after"):
            t = time.perf_counter()
            if name == "before":
                texts = reference_generate(
                    model, tokenizer, prompts, ns.max_new_tokens, seed=r, temperature=1.0
                )
            else:
                texts = llm.generate(
                    model,
                    tokenizer,
                    prompts,
                    max_new_tokens=ns.max_new_tokens,
                    batch_size=ns.answers,
                    greedy=False,
                    seed=r,
                    temperature=1.0,
                )
            gen[name].append(time.perf_counter() - t)
            counts.setdefault(name, []).append(
                sum(len(tokenizer(x, add_special_tokens=False)["input_ids"]) + 1 for x in texts)
            )
    rates = {k: statistics.fmean(counts[k]) / statistics.median(v) for k, v in gen.items()}
    out["generation"] = {
        "answers": ns.answers,
        "max_new_tokens": ns.max_new_tokens,
        "before_tokens_per_s": round(rates["before"], 1),
        "after_tokens_per_s": round(rates["after"], 1),
        "speedup": round(rates["after"] / rates["before"], 2),
        "seconds": gen,
    }
    print(
        f"\ngeneration: {ns.answers} sampled answers, up to {ns.max_new_tokens} tokens: "
        f"before {rates['before']:.0f} tok/s ({statistics.median(gen['before']):.2f}s), "
        f"after {rates['after']:.0f} tok/s ({statistics.median(gen['after']):.2f}s), "
        f"{rates['after'] / rates['before']:.2f}x"
    )
    print(f"cpu, {out['dtype']}, {out['threads']} threads, median of {ns.repeats} repeats")
    if ns.json:
        ns.json.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
