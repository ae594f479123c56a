"""Valuations grounded in fine-tuning itself, for the LLM path.

* ``RetrainingGame``: the cooperative game whose value of a coalition ``S`` of contributors
  is the score (higher is better: minus the distance to the target, per prompt, as the
  rounds score candidates) of a LoRA model fine-tuned from the base on the examples of ``S``;
  ``v(∅)`` is the base model's own score. Every fine-tune is cached by coalition (and its
  seed, derived from the game's seed and the coalition, so a coalition always gets the same
  fine-tune), so that every estimator run on one game shares the work: ``exact`` for small
  crowds, ``permutation`` with truncation (TMC-Shapley) for larger ones.
* ``InRunCredit`` (see ``in_run``): first-order credit of each training example computed
  during the real training of a candidate, at no extra fine-tune.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crowdsft.config import TrainingConfig
from crowdsft.plugins.evaluation import Evaluation
from crowdsft.plugins.valuation import Game

from . import lora as llm
from .space import GenerationConfig, per_prompt_scores


def coalition_seed(seed: int, members: Sequence[int]) -> int:
    """The training seed of one coalition: the same on every run and machine."""
    text = f"{seed}/" + ",".join(map(str, sorted(members)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


class RetrainingGame(Game):
    """``v(S)``: the score of a LoRA fine-tune of ``model`` on the data of coalition ``S``,
    on the evaluation prompts against their target responses; ``v(∅)``: the base model's.

    ``data[i]`` is contributor ``i``'s examples (dicts with ``prompt`` and ``response``).
    ``fits`` counts the fine-tunes actually run (cache misses), ``seconds`` their time with
    their scoring. ``say`` hears one line per new coalition valued."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        embedder: Any,
        data: Sequence[Sequence[dict[str, str]]],
        eval_prompts: Sequence[dict[str, str]],
        target_responses: Sequence[str],
        evaluation: Evaluation,
        training: TrainingConfig,
        generation: GenerationConfig | None = None,
        seed: int = 0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if len(eval_prompts) != len(target_responses) or not eval_prompts:
            raise ValueError("need one target response per evaluation prompt, and at least one")
        self.model, self.tokenizer, self.embedder = model, tokenizer, embedder
        self.data = [list(d) for d in data]
        self.n = len(self.data)
        self.eval_prompts = list(eval_prompts)
        self.target = np.asarray(embedder.embed(list(target_responses)), dtype=float)
        self.evaluation = evaluation
        self.training = training
        self.generation = generation or GenerationConfig()
        self.seed = seed
        self.say = say or (lambda line: None)
        self.cache: dict[bytes, float] = {}
        self.fits = 0
        self.seconds = 0.0

    def values(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n)
        out = np.empty(len(masks))
        for r, mask in enumerate(masks):
            key = np.packbits(mask).tobytes()
            if key not in self.cache:
                self.cache[key] = self._value(mask)
            out[r] = self.cache[key]
        return out

    def _value(self, mask: np.ndarray) -> float:
        started = time.monotonic()
        members = [int(i) for i in np.flatnonzero(mask)]
        examples = [e for i in members for e in self.data[i]]
        adapter = None
        if examples:
            config = dataclasses.replace(self.training, seed=coalition_seed(self.seed, members))
            adapter = llm.fit(self.model, self.tokenizer, examples, None, config).adapter
            self.fits += 1
        score = self.score(adapter)
        self.seconds += time.monotonic() - started
        self.say(
            f"coalition {members or '{}'}: {len(examples)} examples, score {score:.4f} "
            f"({len(self.cache) + 1} coalitions valued, {self.fits} fine-tunes)"
        )
        return score

    def score(self, adapter: dict[str, Any] | None) -> float:
        """The mean per-prompt score of the base model with ``adapter`` (None: the base)."""
        g = self.generation
        with llm.with_adapter(self.model, adapter, self.training) as m:
            texts = llm.generate(
                m,
                self.tokenizer,
                self.eval_prompts,
                g.max_new_tokens,
                g.batch_size,
                g.greedy,
                g.seed,
            )
        emb = np.asarray(self.embedder.embed(texts), dtype=float)
        return float(np.mean(per_prompt_scores(self.evaluation, emb, self.target)))
