"""A round of G = 4 candidates on SmolLM2 on the GPU, three ways: sequential (the local
executor, one candidate after another in the coordinator), packed on one GPU (Ray tasks of
1/G GPU each, all on one card) and spread over several GPUs (Ray tasks of one GPU each;
only where the machine has two or more). For each: the round's wall time, training tokens
per second, and model FLOPs utilisation. Exits 0 with a message where no GPU is present.

    python bench/gpu_round.py [--groups 4] [--steps 20] [--seed 0] [--peak-tflops T] [--json]
    python bench/gpu_round.py --device cpu --steps 2   # the same machinery on a CPU, no MFU

The crowd is the demo's (12 contributors), the round the coordinator's own (RoundRunner:
plan, train, score, select, reward); LoRA on all layers, ``--steps`` steps per candidate,
batch 8. Each mode runs in a coordinator of its own from the same data and seed, so the
modes must pick the same winner (scores agree within bf16 rounding).

Tokens per second counts the training tokens of all G candidates over the round's wall time
(which also holds scoring: generation and embedding). MFU takes 4 N FLOPs per training
token (N parameters: a forward pass is 2 N; the backward pass through frozen weights
another 2 N; LoRA's own weights are too small to count) and compares the round's FLOPs with
the card's dense bf16 peak (a table by card name, or ``--peak-tflops``). It is an estimate:
generation and in-run credit passes are not counted (the card did more than this), and the
output layer is counted at every token though the loss needs it only at response tokens
(less than this). Each GPU task loads the base model afresh (Ray may give a reused worker
another card), which the round's time includes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

# Dense bf16 peak of common cards, TFLOP/s (vendor datasheets, without sparsity).
PEAK_BF16_TFLOPS = {
    "H200": 989.0,
    "H100 SXM": 989.0,
    "H100 80GB HBM3": 989.0,
    "H100 PCIe": 756.0,
    "H100 NVL": 835.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}


def card_peak(name: str) -> float | None:
    """The table's peak for a card called ``name`` (longest matching key), or None."""
    hits = [k for k in PEAK_BF16_TFLOPS if k.lower() in name.lower()]
    return PEAK_BF16_TFLOPS[max(hits, key=len)] if hits else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=4, help="candidates in the round (G)")
    ap.add_argument("--steps", type=int, default=20, help="LoRA steps per candidate")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    ap.add_argument("--peak-tflops", type=float, help="the card's peak, for MFU")
    ap.add_argument("--json", action="store_true", help="print the figures as JSON")
    ns = ap.parse_args()
    os.environ.setdefault("TQDM_DISABLE", "1")  # the GGUF dequantisation bar

    import torch

    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if ns.device == "cuda" and not gpus:
        print("no CUDA device: skipping the GPU round benchmark (unmeasured here)")
        return 0

    import ray

    from crowdsft.config import load_coordinator_config, update_config_file
    from crowdsft.coordinator.rounds.runner import RoundRunner
    from crowdsft.coordinator.server.app import Coordinator
    from crowdsft.coordinator.server.scaffold import init_coordinator
    from crowdsft.coordinator.training.distributed import RayExecutor, WorkerModel
    from crowdsft.coordinator.training.space import build_llm_space
    from crowdsft.demo.crowd import make_crowd, target_set
    from crowdsft.demo.run import DemoSettings, _configure, _submit_direct, _write_jsonl

    def say(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    g = ns.groups
    card = torch.cuda.get_device_name(0) if ns.device == "cuda" else "cpu"
    peak = ns.peak_tflops or (card_peak(card) if ns.device == "cuda" else None)
    # (name, Ray GPUs per task or None for the local executor)
    per_task = 1.0 / g if ns.device == "cuda" else 0.0
    modes: list[tuple[str, float | None]] = [("sequential", None), ("packed", per_task)]
    if gpus >= 2 and ns.device == "cuda":
        modes.append((f"spread over {min(gpus, g)} GPUs", 1.0))
    settings = DemoSettings(groups=g, seed=ns.seed, steps=ns.steps, layers=30, batch_size=8)
    crowd = make_crowd(ns.seed, {k: 3 for k in ("expert-like", "noisy", "off-style", "spammer")})
    prompts = target_set(n_prompts=6, seed=ns.seed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, (name, num_gpus) in enumerate(modes):
            path = init_coordinator(Path(tmp) / f"mode{k}", listen="127.0.0.1:0", force=True)
            _configure(path, settings)
            update_config_file(path, {"model": {"device": ns.device}})
            _write_jsonl(path.parent / "target.jsonl", prompts)
            config = load_coordinator_config(path)
            with Coordinator(config) as coord:
                _submit_direct(crowd, coord, ns.seed)
                space = build_llm_space(config)
                params = sum(p.numel() for p in space.model.parameters())
                executor = None
                startup = 0.0
                if num_gpus is not None:
                    t0 = time.perf_counter()
                    ray.init(
                        address="local",
                        num_cpus=max(g, 2),
                        num_gpus=gpus if ns.device == "cuda" else 0,
                        include_dashboard=False,
                        log_to_driver=False,
                        configure_logging=False,
                    )
                    executor = RayExecutor(
                        WorkerModel(config.model.base, ns.device), num_cpus=1, num_gpus=num_gpus
                    )
                    startup = time.perf_counter() - t0
                runner = RoundRunner(config, coord.store, space, executor=executor)
                say(f"{name}: a round of {g} candidates on {card} ...")
                if ns.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                summary = runner.run()
                if ns.device == "cuda":
                    torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
                infos = [space.training_info(a) for a in summary.adapters]
                tokens = sum(int(i["tokens"]) for i in infos)
                flops = 4.0 * params * tokens
                row = {
                    "mode": name,
                    "gpus_per_candidate": num_gpus,
                    "seconds": round(seconds, 2),
                    "ray_startup_seconds": round(startup, 1) if executor else None,
                    "training_tokens": tokens,
                    "tokens_per_second": round(tokens / seconds, 1),
                    "mfu_percent": (
                        round(100 * flops / seconds / (peak * 1e12), 3) if peak else None
                    ),
                    "dtype": infos[0].get("dtype"),
                    "winner": summary.winner,
                    "scores": summary.scores,
                    "ray_nodes_used": (
                        len({p["node_id"] for p in executor.placements}) if executor else 0
                    ),
                }
                if executor is not None:
                    spans = [(p["started_at"], p["finished_at"]) for p in executor.placements]
                    row["most_tasks_at_once"] = max(
                        sum(a <= t < b for a, b in spans) for t, _ in spans
                    )
                    executor.close()
                    ray.shutdown()
                rows.append(row)
                say(
                    f"  {seconds:.1f}s, {row['tokens_per_second']:,.0f} training tokens/s, "
                    f"winner {summary.winner}"
                )
    base = rows[0]["seconds"]
    for row in rows:
        row["speedup"] = round(base / row["seconds"], 2)
        row["same_winner"] = row["winner"] == rows[0]["winner"]
    out = {
        "card": card,
        "gpus": gpus,
        "peak_tflops": peak,
        "groups": g,
        "steps": ns.steps,
        "seed": ns.seed,
        "parameters": params,
        "modes": rows,
    }
    if ns.json:
        print(json.dumps(out, indent=1))
        return 0
    print(
        f"round of {g} candidates on {card} ({gpus} GPU(s)), {ns.steps} LoRA steps each, "
        f"seed {ns.seed}; MFU against {peak or 'no known'} TFLOP/s"
    )
    for row in rows:
        mfu = f"{row['mfu_percent']}%" if row["mfu_percent"] is not None else "n/a"
        print(
            f"  {row['mode']:<22} {row['seconds']:>7.1f}s  speed-up {row['speedup']:>5.2f}x  "
            f"{row['tokens_per_second']:>10,.0f} tokens/s  MFU {mfu:>8}  "
            f"{row['dtype']}  same winner: {row['same_winner']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
