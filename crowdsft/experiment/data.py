"""The paper's LLM experiment records (``shared/data/paper-llm``), read and checked.

``pools.jsonl`` gives each target emotion's seed comment (rank 0) and its 100 nearest
neighbours (ranks 1-100); ``paper_outputs.jsonl`` the authors' fine-tuned models' answers;
``paper_runs.jsonl`` their tournament's segments and winners. Every vector is the authors'
28-label classifier output, in ``labels.json`` order. See the folder's README.
"""

from __future__ import annotations

import hashlib
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.errors import ConfigError

PROMPT = "write a reddit comment."
FILES = ("labels.json", "pools.jsonl", "paper_runs.jsonl", "paper_outputs.jsonl")


@dataclass(frozen=True)
class PoolText:
    target: str
    rank: int  # 0: the seed comment; 1-100: its nearest neighbours
    index: int  # row in the authors' corpus
    text: str
    vector: np.ndarray = field(compare=False, repr=False)


@dataclass(frozen=True)
class Output:
    """One answer of one of the authors' fine-tuned models."""

    target: str
    model: str  # "single-33", "single-66", "single-100", "multi-g1-c2", ...
    position: int  # the answer's place among its model's answers
    text: str
    vector: np.ndarray = field(compare=False, repr=False)


@dataclass
class PaperData:
    folder: Path
    labels: list[str]
    pools: dict[str, list[PoolText]]  # target -> ranks 0..100
    runs: dict[str, dict[str, Any]]
    outputs: list[Output]

    @property
    def targets(self) -> list[str]:
        return sorted(self.pools)

    def pool(self, target: str) -> list[PoolText]:
        """Ranks 1-100: the pool the experiment fine-tunes on (the seed comment excluded)."""
        return [p for p in self.pools[target] if p.rank >= 1]

    def centroid(self, target: str) -> np.ndarray:
        """The target in the classifier's space: the mean vector of ranks 1-100."""
        return np.mean([p.vector for p in self.pool(target)], axis=0)

    def outputs_of(self, target: str, model: str) -> list[Output]:
        return [o for o in self.outputs if o.target == target and o.model == model]

    def winner(self, target: str, generation: int) -> str:
        """The model name of the authors' winning candidate of a generation."""
        return f"multi-g{generation}-c{int(self.runs[target][f'best_model_{generation}'])}"

    def digest(self) -> str:
        """SHA-256 over the data files, to name what a fit or a run used."""
        h = hashlib.sha256()
        for name in FILES:
            h.update((self.folder / name).read_bytes())
        return h.hexdigest()


def mean_distance(vectors: np.ndarray, target: np.ndarray) -> float:
    """The paper's distance of a model: mean L2 distance of its answers' vectors to the target."""
    return float(np.linalg.norm(np.asarray(vectors) - target, axis=1).mean())


def _model_name(row: dict[str, Any]) -> str:
    if row["arm"] == "single":
        return f"single-{int(row['k'])}"
    return f"multi-g{int(row['generation'])}-c{int(row['candidate'])}"


def load(folder: Path) -> PaperData:
    """Read and check the records; a missing or malformed file is a ConfigError that says
    which."""
    folder = Path(folder)
    missing = [n for n in FILES if not (folder / n).is_file()]
    if missing:
        raise ConfigError(
            f"{folder} is not the paper-llm data folder: missing {', '.join(missing)} "
            "(it ships in shared/data/paper-llm)"
        )
    labels = json.loads((folder / "labels.json").read_text())
    if not isinstance(labels, list) or len(labels) != 28:
        raise ConfigError(f"{folder / 'labels.json'}: expected the 28 GoEmotions labels")

    def rows(name: str) -> list[dict[str, Any]]:
        out = []
        with open(folder / name, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ConfigError(f"{folder / name}:{n}: not JSON ({exc})") from None
                vec = row.get("emotion", row.get("seed_emotion"))
                if vec is not None and len(vec) != len(labels):
                    raise ConfigError(f"{folder / name}:{n}: vector of {len(vec)} values, not 28")
                out.append(row)
        return out

    pools: dict[str, list[PoolText]] = defaultdict(list)
    for r in rows("pools.jsonl"):
        pools[r["target"]].append(
            PoolText(
                r["target"],
                int(r["rank"]),
                int(r["index"]),
                r["text"],
                np.asarray(r["emotion"], dtype=np.float64),
            )
        )
    for target, texts in pools.items():
        texts.sort(key=lambda p: p.rank)
        if [p.rank for p in texts] != list(range(101)):
            raise ConfigError(f"pools.jsonl: target {target!r} lacks ranks 0-100")
    runs = {r["target"]: r for r in rows("paper_runs.jsonl")}
    positions: dict[tuple[str, str], int] = defaultdict(int)
    outputs = []
    for r in rows("paper_outputs.jsonl"):
        key = (r["target"], _model_name(r))
        outputs.append(
            Output(
                r["target"],
                key[1],
                positions[key],
                r["text"],
                np.asarray(r["emotion"], dtype=np.float64),
            )
        )
        positions[key] += 1
    return PaperData(folder, labels, dict(pools), runs, outputs)


def select_targets(data: PaperData, spec: str | int | None) -> list[str]:
    """``None``: all 28; an int N: N targets spread evenly over the sorted labels (the same N
    every time); a comma-separated list of names."""
    targets = data.targets
    if spec is None or spec == "":
        return targets
    if isinstance(spec, int) or str(spec).isdigit():
        n = int(spec)
        if not 1 <= n <= len(targets):
            raise ConfigError(f"--targets N must be between 1 and {len(targets)}")
        step = len(targets) / n
        return [targets[int(i * step)] for i in range(n)]
    names = [t.strip() for t in str(spec).split(",") if t.strip()]
    unknown = [t for t in names if t not in data.pools]
    if unknown:
        raise ConfigError(
            f"unknown target(s) {', '.join(unknown)}; the targets are: {', '.join(targets)}"
        )
    return names


def _text_key(text: str) -> str:
    return " ".join(text.lower().split())


def held_out(output: Output, fraction_denominator: int = 3) -> bool:
    """Whether an answer is kept out of the embedder's fit: about one in
    ``fraction_denominator``, chosen by a hash of its (case- and space-folded) text, so that
    the split is the same on every machine and every copy of a text (models repeat short
    answers) falls on the same side."""
    key = _text_key(output.text).encode()
    return hashlib.sha256(key).digest()[0] % fraction_denominator == 0


def split_texts(
    data: PaperData,
) -> tuple[list[str], np.ndarray, list[Output]]:
    """The embedder's fit set (every pool comment once, and the answers not held out) as
    texts and vectors, and the held-out answers (none of whose texts is in the fit set)."""
    seen: set[int] = set()
    texts: list[str] = []
    vectors: list[np.ndarray] = []
    for target in data.targets:
        for p in data.pools[target]:
            if p.index not in seen:
                seen.add(p.index)
                texts.append(p.text)
                vectors.append(p.vector)
    fitted = {_text_key(t) for t in texts}
    kept_out = []
    for o in data.outputs:
        if held_out(o) and _text_key(o.text) not in fitted:
            kept_out.append(o)
        elif not held_out(o):
            texts.append(o.text)
            vectors.append(o.vector)
    return texts, np.asarray(vectors, dtype=np.float32), kept_out
