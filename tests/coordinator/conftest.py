"""Fixtures for the LLM tests: a tiny random causal LM and tokenizer built from a config."""

from __future__ import annotations

import pytest

from crowdsft.plugins.embedding import Embedder
from crowdsft.testing.tiny import CharEmbedder

CORPUS = [
    "the cat sat on the mat",
    "yes yes yes",
    "no no no",
    "what is two plus two",
    "four",
    "hello there",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
]


@pytest.fixture(scope="module")
def tiny():
    """A tiny Llama and a byte-level BPE tokenizer, both built here, seeded."""
    pytest.importorskip("torch")
    pytest.importorskip("peft")
    from crowdsft.testing.tiny import tiny_model

    return tiny_model(seed=0, corpus=CORPUS)


@pytest.fixture
def char_embedder() -> Embedder:
    return CharEmbedder()
