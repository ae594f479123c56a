"""Valuations grounded in fine-tuning itself, for the LLM path.

* ``RetrainingGame``: the cooperative game whose value of a coalition ``S`` of contributors
  is the score (higher is better: minus the distance to the target, per prompt, as the
  rounds score candidates) of a LoRA model fine-tuned from the base on the examples of ``S``;
  ``v(∅)`` is the base model's own score. Every fine-tune is cached by coalition (and its
  seed, derived from the game's seed and the coalition, so a coalition always gets the same
  fine-tune), so that every estimator run on one game shares the work: ``exact`` for small
  crowds, ``permutation`` with truncation (TMC-Shapley) for larger ones.
* ``InRunCredit``: first-order credit of each training example computed during the real
  training of a candidate, at no extra fine-tune.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from crowdsft.config import TrainingConfig
from crowdsft.plugins.evaluation import Evaluation
from crowdsft.plugins.valuation import Game

from . import lora as llm
from .space import GenerationConfig, answer_and_score


def coalition_seed(seed: int, members: Sequence[int]) -> int:
    """The training seed of one coalition: the same on every run and machine."""
    text = f"{seed}/" + ",".join(map(str, sorted(members)))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


class RetrainingGame(Game):
    """``v(S)``: the score of a LoRA fine-tune of ``model`` on the data of coalition ``S``,
    on the evaluation prompts against their target responses; ``v(∅)``: the base model's.

    ``data[i]`` is contributor ``i``'s examples (dicts with ``prompt`` and ``response``).
    ``fits`` counts the fine-tunes actually run (cache misses), ``seconds`` their time with
    their scoring. ``say`` hears one line per new coalition valued."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        embedder: Any,
        data: Sequence[Sequence[dict[str, str]]],
        eval_prompts: Sequence[dict[str, str]],
        target_responses: Sequence[str],
        evaluation: Evaluation,
        training: TrainingConfig,
        generation: GenerationConfig | None = None,
        seed: int = 0,
        say: Callable[[str], None] | None = None,
    ) -> None:
        if len(eval_prompts) != len(target_responses) or not eval_prompts:
            raise ValueError("need one target response per evaluation prompt, and at least one")
        self.model, self.tokenizer, self.embedder = model, tokenizer, embedder
        self.data = [list(d) for d in data]
        self.n = len(self.data)
        self.eval_prompts = list(eval_prompts)
        self.target = np.asarray(embedder.embed(list(target_responses)), dtype=float)
        self.evaluation = evaluation
        self.training = training
        self.generation = generation or GenerationConfig()
        self.seed = seed
        self.say = say or (lambda line: None)
        self.cache: dict[bytes, float] = {}
        self.fits = 0
        self.seconds = 0.0

    def values(self, masks: np.ndarray) -> np.ndarray:
        masks = np.asarray(masks, dtype=bool).reshape(-1, self.n)
        out = np.empty(len(masks))
        for r, mask in enumerate(masks):
            key = np.packbits(mask).tobytes()
            if key not in self.cache:
                self.cache[key] = self._value(mask)
            out[r] = self.cache[key]
        return out

    def _value(self, mask: np.ndarray) -> float:
        started = time.monotonic()
        members = [int(i) for i in np.flatnonzero(mask)]
        examples = [e for i in members for e in self.data[i]]
        adapter = None
        if examples:
            config = dataclasses.replace(self.training, seed=coalition_seed(self.seed, members))
            adapter = llm.fit(self.model, self.tokenizer, examples, None, config).adapter
            self.fits += 1
        score = self.score(adapter)
        self.seconds += time.monotonic() - started
        self.say(
            f"coalition {members or '{}'}: {len(examples)} examples, score {score:.4f} "
            f"({len(self.cache) + 1} coalitions valued, {self.fits} fine-tunes)"
        )
        return score

    def score(self, adapter: dict[str, Any] | None) -> float:
        """The mean per-prompt score of the base model with ``adapter`` (None: the base)."""
        score, _ = answer_and_score(
            self.model,
            self.tokenizer,
            adapter,
            self.training,
            self.eval_prompts,
            self.generation,
            self.embedder,
            self.evaluation,
            self.target,
        )
        return score


class InRunCredit:
    """First-order credit of every training example, computed during the training itself
    (the "data Shapley in one training run" idea, Wang et al. 2024, first order).

    At each optimizer step the batch's loss is ``sum_i w_i L_i / W`` (``W``: the weights of
    the examples with response tokens), and example ``i`` is credited with its share of the
    step's first-order effect on the target loss: ``lr * (w_i / W) * <grad L_i, grad L_target>``
    over the LoRA parameters, where ``L_target`` is the loss of the target responses on the
    evaluation prompts at the step's parameters. Under plain gradient descent the batch's
    credits add up to the step's first-order decrease of the target loss; the trainer uses
    AdamW, which rescales each parameter's step, so the credit is a first-order,
    gradient-descent-style measure of alignment with the target rather than the actual
    change. (Wang et al. credit ``lr * <grad L_i, grad L_target>``; for unweighted batches of
    B examples that is B times ours, the same ranking within a batch.) Positive for an example
    that teaches what the target wants (for the target itself, the squared gradient norm);
    zero for one with no gradient (no response token left after truncation, or weight 0);
    negative for one that pulls away from it. Credits add up over steps and epochs
    (``credit[k]`` for ``examples[k]`` of the fit).

    The inner products cost no per-example gradients: each LoRA matrix ``W`` is a linear
    map, so example ``i``'s share of the batch gradient is ``sum_t g_it x_it^T`` (the map's
    input ``x`` and output gradient ``g`` at each of its tokens ``t``, both at hand in the
    batch's backward pass), and its inner product with the target gradient ``G`` is
    ``sum_t g_it . (G x_it)``: one extra matrix product per LoRA matrix and step (the "ghost"
    inner product). What it adds to training is that, plus one forward and backward pass on
    the target examples per step; ``seconds`` measures it.

    Pass it to ``lora.fit(..., credit=InRunCredit(targets))``."""

    def __init__(
        self,
        target_examples: Sequence[dict[str, str]],
        also: Sequence[Sequence[dict[str, str]]] = (),
    ) -> None:
        """``also``: further target sets credited in the same run (``also_credit[j]`` for
        ``also[j]``), each at the cost of its own target gradient per step: the coordinator
        pays from the credit against its target and audits against held-out prompts."""
        if not target_examples or any(not t for t in also):
            raise ValueError("in-run credit needs at least one target example per target set")
        self.target_examples = list(target_examples)
        self.target_sets = [self.target_examples] + [list(t) for t in also]
        self.credits = [np.zeros(0) for _ in self.target_sets]
        self.seconds = 0.0
        self.steps = 0
        self._model: Any = None
        self._modules: list[Any] = []
        self._hooks: list[Any] = []
        self._capturing = False
        self._inputs: dict[Any, Any] = {}
        self._grads: dict[Any, Any] = {}
        self._target_grads: list[dict[Any, Any]] = []
        self._targets: list[Any] = []
        self._packed_targets: list[tuple[Any, Any]] = []

    @property
    def credit(self) -> np.ndarray:
        """Each example's credit against the first target set."""
        return self.credits[0]

    @property
    def also_credit(self) -> list[np.ndarray]:
        """Each example's credit against each of the ``also`` target sets."""
        return self.credits[1:]

    # -- called by lora.fit ------------------------------------------------------------------

    def attach(
        self,
        peft_model: Any,
        tokenizer: Any,
        config: TrainingConfig,
        n: int,
        packed: bool = False,
    ) -> None:
        """``packed``: the training runs packed rows (``lora.packed_loss``), so the target
        losses do too, each target set one packed row, the layers before the first trained
        one run once (``lora.FrozenFront``)."""
        import torch

        self._model = peft_model
        self.credits = [np.zeros(n) for _ in self.target_sets]
        tokenised = [llm.tokenize(tokenizer, t, config.max_length) for t in self.target_sets]
        self._targets = [llm.pad(rows, tokenizer.pad_token_id, None) for rows in tokenised]
        self._packed_targets = []
        if packed:
            for rows in tokenised:
                front = llm.FrozenFront.of(peft_model)
                if front is not None:
                    front.compute(rows)
                self._packed_targets.append((llm.pack_rows(rows), front))
        for j, target in enumerate(self._targets):
            if not bool((target.labels[:, 1:] != -100).any()):
                raise ValueError(
                    f"in-run credit target set {j}: no response token is left after "
                    f"truncation to max_length {config.max_length}, so every credit would "
                    "be 0; shorten the prompts or raise training.max_length"
                )
        self._modules = [
            m
            for m in peft_model.modules()
            if isinstance(m, torch.nn.Linear) and m.weight.requires_grad and m.bias is None
        ]
        if not self._modules:
            raise ValueError("in-run credit found no trainable LoRA matrices in the model")
        self._hooks = [m.register_forward_hook(self._forward_hook) for m in self._modules]

    def detach(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks, self._modules = [], []
        self._inputs.clear()
        self._grads.clear()
        self._target_grads = []
        self._model = None

    def before_step(self) -> None:
        """Each target set's loss gradient at the current parameters (hooks off meanwhile)."""
        import torch

        started = time.monotonic()
        self._capturing = False
        model = self._model
        was_training = model.training
        model.eval()
        weights = [m.weight for m in self._modules]
        self._target_grads = []
        for j, target in enumerate(self._targets):
            if self._packed_targets:
                row, front = self._packed_targets[j]
                loss = llm.packed_loss(model, row, front)
            else:
                loss = llm.batch_loss(model, target)
            grads = torch.autograd.grad(loss, weights, allow_unused=True)
            self._target_grads.append(
                {
                    m: (g if g is not None else torch.zeros_like(m.weight)).detach()
                    for m, g in zip(self._modules, grads, strict=True)
                }
            )
        if was_training:
            model.train()
        self._inputs.clear()
        self._grads.clear()
        self._capturing = True
        self.seconds += time.monotonic() - started

    def _forward_hook(self, module: Any, inputs: tuple[Any, ...], output: Any) -> None:
        if not self._capturing or not output.requires_grad:
            return
        self._inputs[module] = inputs[0].detach()

        def keep(grad: Any, module: Any = module) -> None:
            self._grads[module] = grad.detach()

        output.register_hook(keep)

    def after_backward(self, idx: Sequence[int], batch: Any, lr: float) -> None:
        """Credit the batch's examples, from the inputs and output gradients of the LoRA
        matrices in the backward pass that just ran."""
        import torch

        started = time.monotonic()
        self._capturing = False
        size = len(idx)
        ghost = torch.zeros(len(self._targets), size, dtype=torch.float64)
        owner = getattr(batch, "token_owner", None)
        if owner is not None:  # one packed row: each token's example
            if bool((owner < 0).any()):
                raise ValueError("in-run credit needs rows whose tokens are each one example's")
            member = (owner[None, :] == torch.arange(size)[:, None]).double()
        for m in self._modules:
            x, g = self._inputs.get(m), self._grads.get(m)
            if x is None or g is None:
                continue
            for j, target_grad in enumerate(self._target_grads):
                if owner is not None:
                    xt = x.reshape(-1, x.shape[-1]).float()
                    gt = g.reshape(-1, g.shape[-1]).float()
                    per_token = (gt * (xt @ target_grad[m].float().T)).sum(dim=1)
                    ghost[j] += member @ per_token.detach().to("cpu", torch.float64)
                    continue
                xs = x.reshape(size, -1, x.shape[-1]).float()
                gs = g.reshape(size, -1, g.shape[-1]).float()
                gx = xs @ target_grad[m].float().T
                ghost[j] += (gs * gx).sum(dim=(1, 2)).detach().to("cpu", torch.float64)
        # The batch loss is sum_i w_i L_i / W, so the backward pass holds each example's
        # share of the step, (w_i / W) grad L_i: the ghost products are already its credit.
        for j, credit in enumerate(self.credits):
            credit[list(idx)] += lr * ghost[j].numpy()
        self.steps += 1
        self.seconds += time.monotonic() - started


def credit_by_owner(credit: np.ndarray, owners: Sequence[int], n: int) -> np.ndarray:
    """Sum each owner's examples' credit: ``owners[k]`` owns example ``k``."""
    out = np.zeros(n)
    np.add.at(out, np.asarray(owners, dtype=int), credit)
    return out
