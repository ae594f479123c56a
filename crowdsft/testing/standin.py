"""A model space without a model, for tests, benchmarks and fault-injection harnesses.

``StandInSpace`` behaves like ``LLMSpace`` towards the round runner (adapters stored as files
by content hash, written atomically, checked on read; scores that depend on the data each group
trained on) but costs microseconds, so that rounds can run by the hundred while a coordinator
is killed and restarted. It is not a model of fine-tuning: a candidate's score is the mean
"quality" of its group's examples (responses close to ``target_chars`` long score higher) plus
a little seeded noise.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft import atomic
from crowdsft.coordinator.rounds.space import Candidate


def trigram_embedding(texts: Sequence[str], dims: int = 256) -> np.ndarray:
    """Hashed character trigrams: near-identical texts land close together. No model."""
    out = np.zeros((len(texts), dims))
    for i, t in enumerate(texts):
        t = f"  {t.lower()} "
        for j in range(len(t) - 2):
            h = hashlib.blake2b(t[j : j + 3].encode(), digest_size=2).digest()
            out[i, int.from_bytes(h, "big") % dims] += 1
    return out


class TrigramEmbedder:
    """An embedder (``embed(texts)``) of hashed character trigrams, unit length: for runs
    that check machinery without loading an embedding model."""

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        v = trigram_embedding(texts)
        n = np.linalg.norm(v, axis=1, keepdims=True)
        return v / np.where(n > 0, n, 1.0)


def quality(example: dict[str, str], target_chars: int) -> float:
    return float(np.exp(-abs(len(example["response"]) - target_chars) / target_chars))


class StandInSpace:
    def __init__(
        self,
        adapter_dir: Path,
        target_chars: int = 40,
        noise: float = 0.01,
        delay_s: float = 0.0,
    ) -> None:
        """``delay_s``: sleep this long in every propose and score (to stand in for work)."""
        self.delay_s = delay_s
        self.adapter_dir = Path(adapter_dir)
        self.target_chars = target_chars
        self.noise = noise
        self.data: list[list[dict[str, str]]] = []
        self.n_contributors = 0

    def set_data(self, data: Sequence[Sequence[dict[str, str]]]) -> None:
        self.data = [list(d) for d in data]
        self.n_contributors = len(self.data)

    def propose(self, base: Candidate, members: np.ndarray, weights: np.ndarray, rng) -> Candidate:
        time.sleep(self.delay_s)
        w = np.asarray(weights, dtype=float)
        per_member = np.array(
            [
                np.mean([quality(e, self.target_chars) for e in self.data[m]])
                if self.data[m]
                else 0.0
                for m in members
            ]
        )
        q = float(per_member @ w / w.sum()) if w.sum() > 0 else float(per_member.mean())
        q += float(rng.normal(0.0, self.noise))
        body = json.dumps({"base": list(base.lineage), "quality": q}, sort_keys=True).encode()
        digest = hashlib.sha256(body).hexdigest()
        path = self.adapter_dir / f"{digest}.json"
        if not path.exists():
            atomic.write_bytes(path, body)
        return Candidate(base.lineage, digest)

    def _read(self, digest: str) -> dict[str, Any]:
        data = (self.adapter_dir / f"{digest}.json").read_bytes()
        if hashlib.sha256(data).hexdigest() != digest:
            raise ValueError(f"adapter {digest} is corrupt: its bytes no longer match its hash")
        return json.loads(data)

    def score(self, models: Sequence[Candidate]) -> np.ndarray:
        time.sleep(self.delay_s)
        return np.array(
            [self._read(m.lineage[-1])["quality"] if m.lineage else 0.0 for m in models]
        )

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Hashed character trigrams: near-identical texts land close together."""
        return trigram_embedding(texts)

    def training_info(self, adapter: str) -> dict[str, Any]:
        return {"quality": self._read(adapter)["quality"]}
