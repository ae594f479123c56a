"""Fixtures for the LLM tests: a tiny random causal LM and tokenizer built from a config."""

from __future__ import annotations

import numpy as np
import pytest

from crowdsft.plugins.embedding import Embedder

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
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>"
    )
    from crowdsft.coordinator.training import lora as llm

    llm.prepare_tokenizer(tokenizer)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        initializer_range=0.3,
    )
    model = LlamaForCausalLM(config).eval()
    return model, tokenizer


class CharEmbedder(Embedder):
    """Bag of characters, normalised: enough to tell "yes yes yes" from "no no no"."""

    def embed(self, texts):
        out = np.zeros((len(texts), 64))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % 64] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)


@pytest.fixture
def char_embedder() -> Embedder:
    return CharEmbedder()
