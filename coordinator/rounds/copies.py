"""Near-duplicate flagging as a pure function over embeddings.

A contribution is flagged when one of its examples is at least ``threshold`` similar (cosine)
to an example of an *earlier* contribution from *another* node. Flagged contributions never
train a candidate, so a copier gains nothing and the earlier submitter keeps the credit. The
result depends only on the stored contributions, so a round planned again after a crash flags
the same ones.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from crowdsft.validation import history_pairs, payload_examples

from ..store.queries import StoredContribution

CHUNK = 512


def example_text(e: Mapping[str, Any]) -> str:
    """The text of an example that copies are compared on: a conversation's earlier turns
    come last, so that an embedder that truncates long texts still sees what is taught."""
    turns = "".join(f"\n{u}\n{a}" for u, a in history_pairs(e))
    return f"{e.get('system', '')}\n{e['prompt']}\n{e['response']}{turns}"


def example_texts(rows: Sequence[StoredContribution]) -> tuple[list[str], np.ndarray]:
    """Every example's text, and the index (in ``rows``) of the contribution holding it."""
    texts, owner = [], []
    for k, row in enumerate(rows):
        for e in payload_examples(row.payload):
            texts.append(example_text(e))
            owner.append(k)
    return texts, np.asarray(owner, dtype=np.int64)


def near_duplicates(
    emb: np.ndarray,
    owner: np.ndarray,
    seqs: np.ndarray,
    nodes: np.ndarray,
    check: np.ndarray,
    threshold: float,
) -> dict[int, tuple[int, float]]:
    """Flagged contributions: row index -> (row index of the earlier one it copies, cosine).

    ``emb`` holds unit-length embeddings, one per example; ``owner[i]`` is the row of example
    ``i``; ``seqs``/``nodes`` give each row's store order and node; ``check`` is a boolean
    mask over rows (the ones that no round has used yet). A flagged row is never the
    "earlier" side of another flag.
    """
    flagged: dict[int, tuple[int, float]] = {}
    todo = [i for i, k in enumerate(owner) if check[k]]
    for start in range(0, len(todo), CHUNK):
        idx = np.asarray(todo[start : start + CHUNK])
        sims = emb[idx] @ emb.T
        mine = owner[idx]
        earlier = seqs[owner][None, :] < seqs[mine][:, None]
        other = nodes[owner][None, :] != nodes[mine][:, None]
        ok = earlier & other & ~np.isin(owner, list(flagged))[None, :]
        sims = np.where(ok, sims, -np.inf)
        best = sims.argmax(axis=1)
        for j, k in enumerate(mine):
            s = float(sims[j, best[j]])
            if s >= threshold - 1e-9 and (k not in flagged or s > flagged[k][1]):
                flagged[int(k)] = (int(owner[best[j]]), s)
    return flagged


@dataclass
class EmbeddingCache:
    """Unit-length embeddings by text, so that each text is embedded once per runner (rounds
    compare new examples with every earlier one). Bounded: past ``max_texts`` the texts used
    least recently are forgotten (embedded again if they come back), so a flood of junk
    cannot grow the planner's memory without end."""

    embed: Callable[[list[str]], object]
    max_texts: int = 200_000

    def __post_init__(self) -> None:
        self._vectors: OrderedDict[str, np.ndarray] = OrderedDict()

    def __len__(self) -> int:
        return len(self._vectors)

    def __call__(self, texts: list[str]) -> np.ndarray:
        wanted = list(dict.fromkeys(texts))
        new = [t for t in wanted if t not in self._vectors]
        found: dict[str, np.ndarray] = {t: self._vectors[t] for t in wanted if t in self._vectors}
        if new:
            vectors = np.asarray(self.embed(new), dtype=float)
            vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
            found.update(zip(new, vectors, strict=True))
        for t in wanted:
            self._vectors[t] = found[t]
            self._vectors.move_to_end(t)
        while len(self._vectors) > self.max_texts:
            self._vectors.popitem(last=False)
        return np.stack([found[t] for t in texts])


def flag_rows(
    rows: Sequence[StoredContribution],
    unused: set[int],
    embeddings: Callable[[list[str]], np.ndarray],
    threshold: float,
) -> list[tuple[StoredContribution, StoredContribution, float]]:
    """(copy, earlier original, cosine) for every contribution to flag."""
    if not unused:
        return []
    texts, owner = example_texts(rows)
    if not texts:
        return []
    flagged = near_duplicates(
        embeddings(texts),
        owner,
        np.array([r.seq for r in rows]),
        np.array([r.node_id for r in rows]),
        np.array([r.seq in unused for r in rows]),
        threshold,
    )
    return [(rows[k], rows[first], s) for k, (first, s) in sorted(flagged.items())]
