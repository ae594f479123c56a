"""A tiny random causal language model and its tokenizer, built from a config (no download):
for tests and for the ``--quick`` runs of the experiments, where what is checked is the
machinery (data flow, held-out split, determinism), not the quality of the answers."""

from __future__ import annotations

from typing import Any

from crowdsft.plugins.embedding import Embedder

CORPUS = [
    "the cat sat on the mat",
    "yes yes yes",
    "no no no",
    "what is two plus two",
    "four",
    "hello there",
    "write a reddit comment.",
    "a b c d e f g h i j k l m n o p q r s t u v w x y z 0 1 2 3 4 5 6 7 8 9",
]


def tiny_model(seed: int = 0, corpus: list[str] | None = None) -> tuple[Any, Any]:
    """(model, tokenizer): a 2-layer Llama with a 300-token byte-level BPE vocabulary."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from crowdsft.coordinator.training import lora as llm

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|pad|>", "<|eos|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or CORPUS) * 20, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|eos|>", pad_token="<|pad|>"
    )
    llm.prepare_tokenizer(tokenizer)
    torch.manual_seed(seed)
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
    return LlamaForCausalLM(config).eval(), tokenizer


class CharEmbedder(Embedder):
    """Bag of characters, normalised (``dims`` buckets): a model-free embedder for tests and
    ``--quick`` runs, enough to tell "yes yes yes" from "no no no"."""

    def __init__(self, dims: int = 64) -> None:
        self.dims = dims

    def embed(self, texts: Any) -> Any:
        import numpy as np

        out = np.zeros((len(texts), self.dims))
        for i, t in enumerate(texts):
            for ch in t:
                out[i, ord(ch) % self.dims] += 1
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.where(norms > 0, norms, 1)
