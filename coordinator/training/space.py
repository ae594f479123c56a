"""The LLM model space for the round engine: a candidate is a LoRA fine-tune of the current
model on its group's examples; its score is how close its generations on the evaluation
prompts come to the expert responses in an embedding space.

**Per-prompt, not centroid.** The target is a set of evaluation prompts with an expert
response each, so a candidate's distance is the mean over prompts of the distance between
the embedding of its answer and the embedding of the expert's answer *to the same prompt*
(with the configured evaluation function, L2 by default). A centroid (mean embedding of all
answers against the mean of all expert answers) would forget which answer belongs to which
prompt: a model that answered every prompt with the same average-sounding text would score
well. The paper's LLM experiment used a single prompt, where the two coincide.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from crowdsft.coordinator.rounds.space import Candidate
from crowdsft.coordinator.training import lora as llm
from crowdsft.datafiles import Record
from crowdsft.plugins.embedding import Embedder
from crowdsft.plugins.evaluation import Evaluation

__all__ = ["AnswerJob", "Candidate", "GenerationConfig", "LLMSpace", "build_llm_space"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 48
    batch_size: int = 8
    greedy: bool = True
    seed: int = 0
    samples: int = 1  # answers per distinct prompt (sampled: greedy would repeat one)
    temperature: float = 0.7


def centroid_targets(
    prompts: Sequence[dict[str, Any]], responses: Sequence[str], embedder: Embedder
) -> tuple[list[dict[str, Any]], np.ndarray]:
    """The distinct prompts of a target file, in first-seen order, and each one's target:
    the mean embedding of its expert responses. Several expert answers to one prompt stand
    for a style, and a model's answers are compared with their centroid (the paper's LLM
    experiment: one prompt, a hundred comments); a prompt with one expert answer keeps that
    answer's embedding, so a file of distinct prompts is scored per prompt as before."""
    keys: dict[str, int] = {}
    distinct: list[dict[str, Any]] = []
    owner: list[int] = []
    for p in prompts:
        key = json.dumps(p, sort_keys=True)
        if key not in keys:
            keys[key] = len(distinct)
            distinct.append(dict(p))
        owner.append(keys[key])
    emb = np.asarray(embedder.embed(list(responses)), dtype=float)
    target = np.zeros((len(distinct), emb.shape[1]))
    counts = np.zeros(len(distinct))
    for i, k in enumerate(owner):
        target[k] += emb[i]
        counts[k] += 1
    return distinct, target / counts[:, None]


def per_prompt_scores(
    evaluation: Evaluation, generated: np.ndarray, target: np.ndarray
) -> np.ndarray:
    """The evaluation of each generated embedding against the target of its own prompt."""
    return np.array([evaluation(g[None, :], t)[0] for g, t in zip(generated, target, strict=True)])


def answer_and_score(
    model: Any,
    tokenizer: Any,
    adapter: dict[str, Any] | None,
    training: llm.TrainingConfig,
    prompts: Sequence[dict[str, str]],
    generation: GenerationConfig,
    embedder: Embedder,
    evaluation: Evaluation,
    target: np.ndarray,
) -> tuple[float, list[str]]:
    """``model`` with ``adapter`` (None: as it is) answers ``prompts``; returns the mean
    per-prompt score of the answers against ``target`` (one embedding per prompt) and the
    answers."""
    texts = answer(model, tokenizer, adapter, training, AnswerJob(list(prompts), generation))
    emb = np.asarray(embedder.embed(texts), dtype=float)
    return float(np.mean(per_prompt_scores(evaluation, emb, target))), texts


@dataclass(frozen=True)
class TrainingJob:
    """One candidate's training, apart from the model it starts from: everything a worker
    elsewhere needs (plain data, so it pickles)."""

    examples: list[dict[str, str]]
    weights: list[float]  # one per example: its owner's influence weight
    owners: list[int]  # the member (index in the group) each example belongs to
    members: int
    training: llm.TrainingConfig  # with the candidate's seed
    credit_targets: list[dict[str, str]] | None = None
    heldout_credit_targets: list[dict[str, str]] | None = None


@dataclass(frozen=True)
class AnswerJob:
    """What scoring a candidate asks of its model: answers to the evaluation prompts, with
    these generation settings. A worker that trained the candidate can answer them there
    (``answer_job``); embedding and scoring the answers stays with the space."""

    prompts: list[dict[str, str]]
    generation: GenerationConfig


def answer(
    model: Any,
    tokenizer: Any,
    adapter: dict[str, Any] | None,
    training: llm.TrainingConfig,
    job: AnswerJob,
) -> list[str]:
    """``model`` with ``adapter`` (None: as it is) answers ``job``'s prompts."""
    g = job.generation
    with llm.with_adapter(model, adapter, training) as m:
        return llm.generate(
            m,
            tokenizer,
            job.prompts,
            g.max_new_tokens,
            g.batch_size,
            g.greedy,
            g.seed,
            temperature=g.temperature,
        )


def train_job(
    model: Any, tokenizer: Any, job: TrainingJob
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fine-tune a LoRA adapter on ``job`` from ``model`` (left as it was); return the
    adapter's tensors and what the training took (steps, tokens, losses, seed, and each
    member's in-run credit where the job asks for it)."""
    if job.heldout_credit_targets and not job.credit_targets:
        raise ValueError("held-out credit targets need credit targets (the target) as well")
    credit = None
    if job.credit_targets:
        from .valuation import InRunCredit

        also = [job.heldout_credit_targets] if job.heldout_credit_targets else []
        credit = InRunCredit(job.credit_targets, also=also)
    result = llm.fit(model, tokenizer, job.examples, job.weights, job.training, credit=credit)
    info: dict[str, Any] = {
        "steps": result.steps,
        "tokens": result.tokens,
        "losses": result.losses,
        "seed": job.training.seed,
        "device": str(next(model.parameters()).device),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    if credit is not None:
        from .valuation import credit_by_owner

        sums = [credit_by_owner(c, job.owners, job.members) for c in credit.credits]
        bad = sum(int((~np.isfinite(c)).sum()) for c in sums)
        if bad:
            # A diverged step (inf or nan): the ledger cannot sign such a number, and it
            # means nothing; those members are credited 0 and the record says so.
            logger.warning("%d non-finite in-run credit(s) recorded as 0", bad)
            info["credit_nonfinite"] = bad
            sums = [np.nan_to_num(c, nan=0.0, posinf=0.0, neginf=0.0) for c in sums]
        info["member_credit"] = sums[0].tolist()
        if job.heldout_credit_targets:
            info["member_credit_heldout"] = sums[1].tolist()
        info["credit_seconds"] = round(credit.seconds, 3)
    return result.adapter, info


class LLMSpace:
    """Implements ``engine.ModelSpace`` over a causal LM held in memory."""

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        embedder: Embedder,
        data: Sequence[Sequence[dict[str, str]]],
        eval_prompts: Sequence[dict[str, str]],
        target_responses: Sequence[str],
        evaluation: Evaluation,
        training: llm.TrainingConfig,
        adapter_dir: Path,
        generation: GenerationConfig | None = None,
        on_event: Callable[[str, dict[str, Any]], None] | None = None,
        credit_targets: Sequence[dict[str, str]] | None = None,
        heldout_credit_targets: Sequence[dict[str, str]] | None = None,
        copy_embedder: Embedder | None = None,
    ) -> None:
        """``credit_targets``: prompt/response pairs (the coordinator's target); when given,
        every candidate's training credits its examples in-run (``InRunCredit``) against
        them, and the candidate's training record carries ``member_credit``, one sum per
        member (in ``members`` order): what the ``credit`` reward pays from.
        ``heldout_credit_targets``: prompts no choice sees (the demo's reported set); the
        same training also credits against them, recorded as ``member_credit_heldout``, for
        the report's grounded values measured apart from anything that chose."""
        if len(eval_prompts) != len(target_responses) or not eval_prompts:
            raise ValueError("need one expert response per evaluation prompt, and at least one")
        self.model = model
        self.tokenizer = tokenizer
        self.embedder = embedder
        self.copy_embedder = copy_embedder or embedder
        self.data = [list(d) for d in data]
        # distinct prompts, each with the centroid of its expert responses
        self.eval_prompts, self.target = centroid_targets(eval_prompts, target_responses, embedder)
        self.evaluation = evaluation
        self.training = training
        self.generation = generation or GenerationConfig()
        self.adapter_dir = Path(adapter_dir)
        self.chain: tuple[str, ...] = ()
        self.n_contributors = len(self.data)
        self.on_event = on_event or (lambda kind, info: None)
        if heldout_credit_targets and not credit_targets:
            raise ValueError("held-out credit targets need credit targets (the target) as well")
        self.credit_targets = list(credit_targets) if credit_targets else None
        self.heldout_credit_targets = (
            list(heldout_credit_targets) if heldout_credit_targets else None
        )
        self._scores: dict[tuple[str, ...], float] = {}
        self.last_generations: dict[tuple[str, ...], list[str]] = {}
        self.train_log: list[dict[str, Any]] = []

    def set_data(self, data: Sequence[Sequence[dict[str, str]]]) -> None:
        """The contributors' examples for the next round (index = contributor)."""
        self.data = [list(d) for d in data]
        self.n_contributors = len(self.data)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Texts in the near-duplicate detection's embedding (``copy_embedder``)."""
        return np.asarray(self.copy_embedder.embed(list(texts)), dtype=float)

    def training_info(self, adapter: str) -> dict[str, Any]:
        for entry in reversed(self.train_log):
            if entry["adapter"] == adapter:
                return {k: v for k, v in entry.items() if k != "adapter"}
        return {}

    def begin_round(self, round_id: int) -> None:
        """Scores of round ``round_id`` come from answers sampled for that round: with
        sampled answers, every model (the round's starting model too) answers afresh with a
        seed of the round's own. Otherwise the starting model would keep the score that made
        it win the last round, the best of several draws, which flatters it and makes the
        improvement guard harder to pass than it is. Greedy answers do not depend on a seed:
        nothing changes for them."""
        if self.generation.greedy:
            return
        if not hasattr(self, "_first_seed"):
            self._first_seed = self.generation.seed
        seed = int.from_bytes(
            hashlib.sha256(f"{self._first_seed}/{round_id}".encode()).digest()[:4], "big"
        )
        if seed != self.generation.seed:
            self.generation = dataclasses.replace(self.generation, seed=seed)
            self._scores.clear()

    # -- the current model ----------------------------------------------------------------

    def materialise(self, base: Candidate) -> None:
        """Make the in-memory model the model of ``base.lineage`` (merging a new winner)."""
        lineage = base.lineage
        if lineage == self.chain:
            return
        if lineage[: len(self.chain)] != self.chain:
            raise ValueError(
                "the in-memory model cannot go back to an earlier lineage; reload the base"
            )
        for digest in lineage[len(self.chain) :]:
            adapter = llm.load_adapter(self.adapter_dir, digest)
            self.model = llm.merge_adapter(self.model, adapter, self.training)
        self.chain = lineage

    @property
    def records_credit(self) -> bool:
        """Whether every candidate's training records its members' in-run credit."""
        return bool(self.credit_targets)

    # -- ModelSpace ---------------------------------------------------------------------------

    def job(self, members: np.ndarray, weights: np.ndarray, rng) -> TrainingJob:
        """What training a candidate for ``members`` takes, apart from the model: their
        examples in order, each weighted by its owner's influence weight, and the seed
        (drawn from ``rng``: the same draw wherever the job then runs)."""
        examples: list[dict[str, str]] = []
        example_weights: list[float] = []
        owners: list[int] = []
        for k, (m, w) in enumerate(zip(members, weights, strict=True)):
            examples += self.data[int(m)]
            example_weights += [float(w)] * len(self.data[int(m)])
            owners += [k] * len(self.data[int(m)])
        return TrainingJob(
            examples=examples,
            weights=example_weights,
            owners=owners,
            members=len(members),
            training=dataclasses.replace(self.training, seed=int(rng.integers(2**31 - 1))),
            credit_targets=self.credit_targets,
            heldout_credit_targets=self.heldout_credit_targets,
        )

    def record_trained(self, digest: str, info: dict[str, Any]) -> None:
        """Remember what training an adapter took (``training_info``), also for adapters
        trained elsewhere (an executor's worker)."""
        self.train_log.append({"adapter": digest} | info)

    def answer_job(self) -> AnswerJob:
        """What scoring asks of a candidate's model, for a worker to answer where it trained
        the candidate (``record_answers`` then scores the answers here)."""
        n = self.generation.samples
        return AnswerJob([p for p in self.eval_prompts for _ in range(n)], self.generation)

    def has_score(self, model: Candidate) -> bool:
        """Whether ``score`` knows ``model``'s score without generating."""
        return model.lineage in self._scores

    def record_answers(self, model: Candidate, texts: Sequence[str]) -> float:
        """Score ``model`` from its answers to ``answer_job()``'s prompts, given in order
        (answered elsewhere); ``score`` then takes the score from here."""
        n = self.generation.samples
        if len(texts) != n * len(self.eval_prompts):
            raise ValueError(
                f"{len(texts)} answers for {len(self.eval_prompts)} evaluation prompts "
                f"x {n} samples"
            )
        emb = np.asarray(self.embedder.embed(list(texts)), dtype=float)
        targets = np.repeat(self.target, n, axis=0)
        score = float(np.mean(per_prompt_scores(self.evaluation, emb, targets)))
        key = model.lineage
        self._scores[key] = score
        self.last_generations[key] = list(texts)
        self.on_event("scored", {"adapter": model.adapter, "score": score})
        return score

    def propose(self, base: Candidate, members: np.ndarray, weights: np.ndarray, rng) -> Candidate:
        self.materialise(base)
        job = self.job(members, weights, rng)
        self.on_event("train_start", {"members": len(members), "examples": len(job.examples)})
        adapter, info = train_job(self.model, self.tokenizer, job)
        digest = llm.save_adapter(adapter, self.adapter_dir)
        entry = {"adapter": digest} | info
        self.train_log.append(entry)
        self.on_event(
            "train_end",
            {
                "adapter": digest,
                "steps": info["steps"],
                "loss": info["losses"][-1] if info["losses"] else None,
            },
        )
        return Candidate(self.chain, digest)

    def score(self, models: Sequence[Candidate]) -> np.ndarray:
        return np.array([self._score(m) for m in models])

    def _score(self, model: Candidate) -> float:
        key = model.lineage
        if key in self._scores:
            return self._scores[key]
        if model.chain != self.chain:
            self.materialise(Candidate(model.chain))
        adapter = llm.load_adapter(self.adapter_dir, model.adapter) if model.adapter else None
        texts = answer(self.model, self.tokenizer, adapter, self.training, self.answer_job())
        return self.record_answers(model, texts)


def _target(record: Record, with_response: bool = True) -> dict[str, Any]:
    """A target file's record as the space takes it: its prompt, its earlier turns and its
    system prompt (an empty one is none), with or without the expert's response."""
    d = record.as_dict()
    if not d.get("system"):
        d.pop("system", None)
    if not with_response:
        del d["response"]
    return d


def build_llm_space(
    config: Any, plugins: Any = None, on_event: Callable[[str, dict[str, Any]], None] | None = None
) -> LLMSpace:
    """The LLM space that a coordinator's config describes: the base model (loaded once),
    the embedder, the target file and the evaluation function."""
    from crowdsft.datafiles import read_records
    from crowdsft.errors import ConfigError
    from crowdsft.plugins.manager import get_plugins

    plugins = plugins or get_plugins()
    target = config.target_path
    if target is None:
        raise ConfigError(
            "rounds need a target: set evaluation.target_file in the coordinator config to a "
            "JSONL file of evaluation prompts with expert responses"
        )
    records = read_records(target)
    v = config.valuation
    reward = plugins.create("reward", config.rounds.reward)
    heldout = None
    if v.heldout_file is not None:
        if not (v.in_run or getattr(reward, "needs_credit", False)):
            raise ConfigError(
                "valuation.heldout_file credits training against held-out prompts, which "
                "needs in-run credit: set valuation.in_run = true"
            )
        heldout = [_target(r) for r in read_records(config.resolve(v.heldout_file))]
    device, dtype = llm.device_and_dtype(config.model.device)
    logger.info("loading base model %s on %s", config.model.base, device)
    model, tokenizer = llm.load_base_model(config.model.base, device, dtype)

    def make_embedder(name: str) -> Any:
        # on the model's device, where its factory takes one
        factory = plugins.get("embedder", name).factory
        try:
            takes_device = "device" in inspect.signature(factory).parameters
        except (TypeError, ValueError):
            takes_device = False
        options = {"device": device.type} if takes_device else {}
        return plugins.create("embedder", name, **options)

    embedder = make_embedder(config.evaluation.embedder)
    copies_with = config.admission.near_duplicate_embedder
    copy_embedder = (
        embedder
        if copies_with == config.evaluation.embedder
        or config.admission.near_duplicate_threshold <= 0
        else make_embedder(copies_with)
    )
    e = config.evaluation
    return LLMSpace(
        model,
        tokenizer,
        embedder,
        [],
        eval_prompts=[_target(r, with_response=False) for r in records],
        target_responses=[r.response for r in records],
        evaluation=plugins.create("evaluation", e.function),
        training=config.training,
        adapter_dir=config.adapter_dir,
        generation=GenerationConfig(
            e.max_new_tokens, e.batch_size, e.greedy, e.seed, e.samples, e.temperature
        ),
        on_event=on_event,
        credit_targets=(
            [_target(r) for r in records]
            if v.in_run or getattr(reward, "needs_credit", False)
            else None
        ),
        heldout_credit_targets=heldout,
        copy_embedder=copy_embedder,
    )
