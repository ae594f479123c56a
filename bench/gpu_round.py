"""One fine-tuning round of the default configuration on CUDA: time per candidate and
training tokens per second. Skips cleanly (exit 0, a message) where no GPU is present.

    python bench/gpu_round.py [--groups 3] [--steps 20]

It builds the demo's synthetic crowd and target, trains one LoRA candidate per group from
SmolLM2-135M-Instruct in bf16 on the GPU, scores each, and prints the figures.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--steps", type=int, default=20)
    ns = ap.parse_args()
    import numpy as np
    import torch

    if not torch.cuda.is_available():
        print("no CUDA device: skipping the GPU round benchmark")
        return 0
    from crowdsft.config import TrainingConfig
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.coordinator.training.space import Candidate, GenerationConfig, LLMSpace
    from crowdsft.demo.crowd import make_crowd, target_set
    from crowdsft.plugins.manager import get_plugins

    device, dtype = llm.device_and_dtype("cuda")
    t0 = time.perf_counter()
    model, tok = llm.load_base_model("smollm2", device, dtype)
    print(
        f"device {torch.cuda.get_device_name()}, {dtype}; model loaded in "
        f"{time.perf_counter() - t0:.1f}s"
    )
    plugins = get_plugins()
    crowd = make_crowd(0)
    target = target_set()
    with tempfile.TemporaryDirectory() as tmp:
        space = LLMSpace(
            model,
            tok,
            plugins.create("embedder", "minilm", device="cuda"),
            [c.examples for c in crowd],
            [{"prompt": t["prompt"]} for t in target],
            [t["response"] for t in target],
            plugins.create("evaluation", "l2"),
            TrainingConfig(max_steps=ns.steps, epochs=1000),
            Path(tmp),
            GenerationConfig(),
        )
        groups = np.array_split(np.arange(len(crowd)), ns.groups)
        rng = np.random.default_rng(0)
        for g, members in enumerate(groups):
            torch.cuda.synchronize()
            t = time.perf_counter()
            cand = space.propose(Candidate(), members, np.ones(len(members)), rng)
            torch.cuda.synchronize()
            train_s = time.perf_counter() - t
            info = space.training_info(cand.adapter)
            t = time.perf_counter()
            score = space.score([cand])[0]
            score_s = time.perf_counter() - t
            print(
                f"candidate {g}: {info['steps']} steps, {info['tokens']} tokens in "
                f"{train_s:.2f}s ({info['tokens'] / train_s:,.0f} training tokens/s); "
                f"scoring {score_s:.2f}s; score {score:.4f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
