"""A crowd with bad contributors on real text, through the product's own round engine.

For each target emotion of the paper's data and each seed:

- **the crowd**: honest contributors of ``per_contributor`` real comments each, dealt from the
  target's pool (its 100 nearest comments, shuffled by the seed), and bad contributors of as
  many comments each from the emotions whose pools lie farthest from the target (by centroid
  distance in the embedder's space; the bad contributors are spread over the ``far_pools``
  farthest, since one emotion, gratitude, is the farthest from most targets). A bad fraction
  ``f`` adds ``round(n_honest * f / (1 - f))`` bad contributors to the honest ones; the bad
  contributors of a smaller fraction are among those of a larger one.
- **the target**: the centroid of the target's pool in the embedder's space (the paper's);
  the coordinator's target file holds the pool's comments as expert answers to the one
  prompt, which the product scores against their centroid (``evaluation.samples``).
- **the arms**: ``base`` (the untouched model), ``single_all`` (one fine-tune on everything
  the coordinator accepted and would train on), ``single_clean`` (on the honest contributors'
  part only: the oracle), and ``tournament``: a coordinator with the product's defaults, the
  crowd's contributions signed by each contributor's key and submitted to it, ``rounds``
  rounds run by its ``RoundRunner`` (grouping, LoRA candidates, the improvement guard, the
  reward, points, consumption, the ledger), the final model its lineage; and
  ``single_all_matched``: one fine-tune on everything with as many optimizer steps as the
  tournament's lineage made in all (the steps of each round's winner, summed), so that
  selection can be told from training longer (a lineage of up to ``rounds`` fine-tunes, a
  round the consolidated candidate wins training on everything again). Rows computed before
  this arm get it from ``CrowdExperiment.matched_arm``: their recorded rounds replayed
  through the round engine without training (``Replayed``), which gives the lineage's steps,
  then the same fine-tune (``bench/crowd_matched.py``).
- **held out**: rounds choose on ``answers`` sampled answers per candidate (the evaluation
  seed); every reported distance comes from ``answers`` other answers, sampled with seeds no
  choice used. The reported distance is the paper's: the mean L2 distance of the answers'
  vectors to the target centroid.
- **fairness**: for each reward rule (rank, regression, credit), the points it gives over the
  recorded rounds (the round outcomes replayed through the rule, as ``node verify`` replays
  them), and the AUC with which those points separate honest from bad contributors (the
  chance that an honest contributor holds more points than a bad one; ties count half). The
  rounds themselves were decided under the configured reward; the other rules' points are
  what they would have awarded for the same rounds.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from crowdsft.stats import mean_ci95

from .data import PROMPT, PaperData, mean_distance
from .paper_llm import derived_seed

BAD_FRACTIONS = (0.0, 0.3, 0.5)
REWARDS = ("rank", "regression", "credit")
# Bumped when a change to the code makes rows of the same settings differ.
CODE_VERSION = 1


@dataclass(frozen=True)
class CrowdSettings:
    per_contributor: int = 10  # comments per contributor
    far_pools: int = 3  # the bad contributors' emotions: the farthest pools from the target
    rounds: int = 3
    answers: int = 50  # sampled answers per model and set (selection, reported)
    max_new_tokens: int = 20
    temperature: float = 1.0
    # fine-tuning: the paper's epoch rule, and the settings tuned in bench/tune_paper_llm.py
    learning_rate: float = 6e-3
    layers: int | None = 8
    batch_size: int = 4
    rank: int = 8
    max_length: int = 96
    # the round engine: None keeps the product's default
    consolidate_every: int | None = None
    reward: str | None = None
    # in-run credit against this many of the target's comments, recorded in every
    # candidate's training, for the credit rule's points (0: none, and no credit AUC)
    credit_targets: int = 10

    def coordinator(self, seed: int) -> dict[str, dict[str, Any]]:
        """The coordinator.toml values the experiment sets: its target, its evaluation and
        fine-tuning; every other setting (grouping, selection, reward, consumption, ...)
        is the product's default unless given here."""
        rounds: dict[str, Any] = {"seed": seed}
        if self.consolidate_every is not None:
            rounds["consolidate_every"] = self.consolidate_every
        if self.reward is not None:
            rounds["reward"] = self.reward
        return {
            "evaluation": {
                "target_file": "target.jsonl",
                "embedder": "goemotions",
                "samples": self.answers,
                "greedy": False,
                "temperature": self.temperature,
                "max_new_tokens": self.max_new_tokens,
                "batch_size": self.answers,
                "seed": derived_seed(seed, "select"),
            },
            "training": {
                "rank": self.rank,
                "alpha": 2 * self.rank,
                "learning_rate": self.learning_rate,
                "epochs": "auto",
                "batch_size": self.batch_size,
                "max_length": self.max_length,
                "layers": self.layers,
            },
            "rounds": rounds,
            "rate_limit": {"contributions_per_s": 10_000.0, "burst": 10_000},
        }


def n_bad(n_honest: int, fraction: float) -> int:
    """Bad contributors that make ``fraction`` of a crowd with ``n_honest`` honest ones."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError("a bad fraction lies in [0, 1)")
    return round(n_honest * fraction / (1.0 - fraction))


@dataclass(frozen=True)
class Member:
    name: str
    honest: bool
    source: str  # the emotion whose pool its comments come from
    examples: list[dict[str, str]] = field(repr=False)


def _key(text: str) -> str:
    """Texts the coordinator takes for duplicates compare equal (``validation.normalise``)."""
    from crowdsft.validation import normalise

    return normalise(text)


def far_emotions(centroids: dict[str, np.ndarray], target: str, k: int) -> list[str]:
    """The ``k`` emotions whose centroids lie farthest from ``target``'s, farthest first."""
    here = centroids[target]
    others = sorted(
        (t for t in centroids if t != target),
        key=lambda t: -float(np.linalg.norm(centroids[t] - here)),
    )
    return others[:k]


def make_crowd(
    data: PaperData,
    target: str,
    seed: int,
    bad_count: int,
    far: Sequence[str],
    per: int = 10,
) -> list[Member]:
    """The honest contributors (the target's pool without repeats, shuffled by ``seed``,
    ``per`` comments each, the last one the rest) and ``bad_count`` bad ones (``per``
    comments each from the ``far`` pools in turn, none of them a comment of the target's
    pool). The same ``seed`` deals the same comments, whatever ``bad_count``: a smaller
    crowd's bad contributors are the first of a larger's."""
    pool: list[str] = []
    taken: set[str] = set()
    for p in data.pool(target):  # a comment the pool holds twice is submitted once
        if _key(p.text) not in taken:
            taken.add(_key(p.text))
            pool.append(p.text)
    order = np.random.default_rng(derived_seed(target, seed, "crowd")).permutation(len(pool))
    honest = [
        Member(
            f"honest-{i:02d}",
            True,
            target,
            [{"prompt": PROMPT, "response": pool[j]} for j in order[i * per : (i + 1) * per]],
        )
        for i in range(-(-len(pool) // per))
    ]
    queues: dict[str, list[str]] = {}
    for name in far:
        texts = []
        for p in data.pool(name):
            k = _key(p.text)
            if k not in taken:
                taken.add(k)
                texts.append(p.text)
        rng = np.random.default_rng(derived_seed(target, seed, "bad", name))
        queues[name] = [texts[j] for j in rng.permutation(len(texts))]
    bad = []
    for b in range(bad_count):
        name = far[b % len(far)]
        texts, queues[name] = queues[name][:per], queues[name][per:]
        if len(texts) < per:
            raise ValueError(f"the {name} pool has too few comments left for bad contributor {b}")
        bad.append(
            Member(
                f"bad-{b:02d}-{name}",
                False,
                name,
                [{"prompt": PROMPT, "response": t} for t in texts],
            )
        )
    return honest + bad


def auc(honest: Sequence[float], bad: Sequence[float]) -> float | None:
    """The chance that an honest contributor holds more points than a bad one (ties count
    half): 1 separates them perfectly, 0.5 is chance. None without both kinds."""
    if not honest or not bad:
        return None
    wins = sum((h > b) + 0.5 * (h == b) for h in honest for b in bad)
    return float(wins / (len(honest) * len(bad)))


def points_by_rule(
    records: list[dict[str, Any]], credits: dict[int, list[list[float] | None]], plugins: Any
) -> dict[str, dict[str, float] | None]:
    """Each reward rule's points (starting at 1) for everyone in the last record's population,
    over the recorded rounds: every round's outcome replayed through the rule, as node
    verification replays the rule a record names. ``credits``: per round, each candidate's
    members' in-run credit from the store (the records carry it only under the credit
    rule); a rule that needs it gets None where a round lacks it."""
    from crowdsft.tournament import DecidedRound, award

    if not records:
        return dict.fromkeys(REWARDS)
    population = list(records[-1]["population"])
    index = {n: i for i, n in enumerate(population)}
    out: dict[str, dict[str, float] | None] = {}
    for name in REWARDS:
        reward = plugins.create("reward", name)
        with_credit: list[dict[str, Any]] | None = []
        for rec in records:
            rec = json.loads(json.dumps(rec))
            found = credits.get(int(rec["round_id"]), [])
            if getattr(reward, "needs_credit", False):
                if len(found) != len(rec["candidates"]) or any(c is None for c in found):
                    with_credit = None
                    break
                for cand, c in zip(rec["candidates"], found, strict=True):
                    cand["member_credit"] = c
            assert with_credit is not None
            with_credit.append(rec)
        if with_credit is None:
            out[name] = None
            continue
        reward.reset(len(population))
        points = np.ones(len(population))
        for rec in with_credit:
            decided = DecidedRound.from_record(rec)
            points = award(reward, points, decided.outcome(index), decided.updated)
        out[name] = {n: float(points[i]) for i, n in enumerate(population)}
    return out


def answer_stats(texts: Sequence[str], vectors: np.ndarray) -> dict[str, float]:
    """How varied a model's answers are: ``spread``, the mean L2 distance of their vectors
    to their own centroid (the target pool's own spread is the reference: a model that
    writes one prototypical comment over and over can come close to the target with a
    spread near 0), and ``distinct``, the share of different answers."""
    v = np.asarray(vectors, dtype=float)
    return {
        "spread": float(np.linalg.norm(v - v.mean(axis=0), axis=1).mean()),
        "distinct": len(set(texts)) / len(texts) if texts else 0.0,
    }


def run_key(settings: CrowdSettings, model: str, data_digest: str, dtype: str, quick: bool) -> str:
    blob = json.dumps(
        {
            "settings": asdict(settings),
            "code": CODE_VERSION,
            "model": "tiny" if quick else model,
            "dtype": dtype,
            "data_sha256": data_digest,
        },
        sort_keys=True,
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class CrowdExperiment:
    """One loaded model, tokenizer and embedder (and the near-duplicate check's), run over
    targets, seeds and bad fractions."""

    def __init__(
        self,
        data: PaperData,
        model: Any,
        tokenizer: Any,
        embedder: Any,
        copy_embedder: Any,
        settings: CrowdSettings,
        say: Callable[[str], None] = print,
        via_grpc: bool = False,
        workdir: Path | None = None,
    ) -> None:
        self.data, self.model, self.tokenizer = data, model, tokenizer
        self.embedder, self.copy_embedder = embedder, copy_embedder
        self.settings, self.say, self.via_grpc = settings, say, via_grpc
        self.workdir = workdir
        self.base_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self._centroids: dict[str, np.ndarray] | None = None
        self.last_stats: dict[str, float] = {}
        self._kept_stats: dict[str, dict[str, float]] = {}

    # -- pieces ------------------------------------------------------------------------------

    def centroids(self) -> dict[str, np.ndarray]:
        """Every emotion's pool centroid in the embedder's space (computed once)."""
        if self._centroids is None:
            self._centroids = {
                t: np.asarray(self.embedder.embed([p.text for p in self.data.pool(t)])).mean(0)
                for t in self.data.targets
            }
        return self._centroids

    def _reset(self) -> None:
        self.model.load_state_dict(self.base_state)

    def _training(self, seed: int, steps: int | None = None, n: int = 0) -> Any:
        """The fine-tuning settings; with ``steps``, exactly that many optimizer steps over
        ``n`` examples (as many epochs as it takes, the last one cut short)."""
        from crowdsft.config import TrainingConfig

        s = self.settings
        epochs: int | Literal["auto"] = "auto"
        if steps is not None:
            epochs = max(1, -(-steps // -(-n // s.batch_size)))
        return TrainingConfig(
            rank=s.rank,
            alpha=2 * s.rank,
            learning_rate=s.learning_rate,
            epochs=epochs,
            max_steps=steps,
            batch_size=s.batch_size,
            max_length=s.max_length,
            layers=s.layers,
            seed=seed,
        )

    def _reported(self, adapter: Any, seed: int, goal: np.ndarray) -> float:
        """The model (with ``adapter``) answers ``answers`` times with sampling seed ``seed``;
        the mean L2 distance of the answers' vectors to ``goal``."""
        from crowdsft.coordinator.training import lora as llm

        s = self.settings
        with llm.with_adapter(self.model, adapter, self._training(0)) as m:
            texts = llm.generate(
                m,
                self.tokenizer,
                [{"prompt": PROMPT}] * s.answers,
                max_new_tokens=s.max_new_tokens,
                batch_size=s.answers,
                greedy=False,
                seed=seed,
                temperature=s.temperature,
            )
        vectors = np.asarray(self.embedder.embed(texts))
        self.last_stats = answer_stats(texts, vectors)
        return mean_distance(vectors, goal)

    def _single(
        self,
        examples: list[dict[str, str]],
        seed: int,
        report_seed: int,
        goal,
        steps: int | None = None,
    ) -> float:
        """One fine-tune from the base on ``examples`` (the paper's epoch rule, or exactly
        ``steps`` optimizer steps), and its held-out distance."""
        from crowdsft.coordinator.training import lora as llm

        self._reset()
        config = self._training(seed, steps, len(examples))
        fit = llm.fit(self.model, self.tokenizer, examples, None, config)
        return self._reported(fit.adapter, report_seed, goal)

    def _steps(self, n: int) -> int:
        """The optimizer steps of one fine-tune on ``n`` examples (the paper's epoch rule)."""
        return self._training(0).epochs_for(n) * -(-n // self.settings.batch_size)

    def _matched(
        self,
        target: str,
        seed: int,
        fraction: float,
        everything: list[dict[str, str]],
        steps: int,
        goal: np.ndarray,
    ) -> float | None:
        """``single_all_matched``: single-all trained for exactly ``steps`` optimizer steps,
        from its own seeds (None when no round updated the model: no steps)."""
        if steps <= 0:
            return None
        tag = (target, seed)
        return self._single(
            everything,
            derived_seed(*tag, "single-all-matched", fraction),
            derived_seed(*tag, "report", "single-all-matched", fraction),
            goal,
            steps=steps,
        )

    @contextlib.contextmanager
    def _crowd_coordinator(
        self,
        target: str,
        seed: int,
        members: list[Member],
        rounds: dict[str, Any] | None = None,
    ) -> Iterator[CrowdCoordinator]:
        """A fresh coordinator (the experiment's settings, the product's defaults otherwise,
        ``rounds`` over both) in a temporary folder, with every member's comments signed by
        its seeded key and submitted (or, ``via_grpc``, by node processes), and the model
        space its rounds train and score in."""
        from crowdsft.config import load_coordinator_config, update_config_file
        from crowdsft.coordinator.server.app import Coordinator
        from crowdsft.coordinator.server.scaffold import init_coordinator
        from crowdsft.coordinator.training.space import GenerationConfig, LLMSpace
        from crowdsft.demo.run import _spawn_nodes, seeded_identity
        from crowdsft.envelope import sign_contribution
        from crowdsft.plugins.manager import get_plugins

        s = self.settings
        tag = (target, seed)
        with tempfile.TemporaryDirectory(dir=self.workdir) as tmp:
            root = Path(tmp)
            config_path = init_coordinator(root / "coordinator", listen="127.0.0.1:0", force=True)
            values = s.coordinator(derived_seed(*tag, "rounds"))
            values["rounds"].update(rounds or {})
            update_config_file(config_path, values)
            pool = self.data.pool(target)
            target_rows = [{"prompt": PROMPT, "response": p.text} for p in pool]
            (config_path.parent / "target.jsonl").write_text(
                "".join(json.dumps(r) + "\n" for r in target_rows)
            )
            config = load_coordinator_config(config_path)
            with Coordinator(config) as coord:
                names: dict[str, str] = {}
                if self.via_grpc:
                    crowd = [_as_contributor(m) for m in members]
                    names = _spawn_nodes(crowd, coord.address, root, derived_seed(*tag, "keys"))
                else:
                    for m in members:
                        ident = seeded_identity(derived_seed(*tag, "keys"), m.name)
                        names[ident.node_id] = m.name
                        for ex in m.examples:
                            coord.service.submit(
                                sign_contribution(
                                    ident, [ex], coordinator=coord.identity.public_key
                                )
                            )
                honest = {n for n, name in names.items() if name.startswith("honest-")}
                e = config.evaluation
                space = LLMSpace(
                    self.model,
                    self.tokenizer,
                    self.embedder,
                    [],
                    eval_prompts=[{"prompt": PROMPT}] * len(target_rows),
                    target_responses=[r["response"] for r in target_rows],
                    evaluation=get_plugins().create("evaluation", e.function),
                    training=config.training,
                    adapter_dir=config.adapter_dir,
                    generation=GenerationConfig(
                        e.max_new_tokens, e.batch_size, e.greedy, e.seed, e.samples, e.temperature
                    ),
                    # in-run credit only where there is someone to tell apart
                    credit_targets=(
                        target_rows[: s.credit_targets]
                        if s.credit_targets and len(names) > len(honest)
                        else None
                    ),
                    copy_embedder=self.copy_embedder,
                )
                yield CrowdCoordinator(root, coord, config, names, honest, space)

    def _members(self, target: str, seed: int, fraction: float) -> list[Member]:
        """The crowd at ``fraction`` bad: the honest contributors and the first bad ones
        (``make_crowd`` deals the same comments whatever the number of bad ones)."""
        s = self.settings
        pool = self.data.pool(target)
        far = far_emotions(self.centroids(), target, s.far_pools)
        n_honest = -(-len({_key(p.text) for p in pool}) // s.per_contributor)
        return make_crowd(
            self.data, target, seed, n_bad(n_honest, fraction), far, s.per_contributor
        )

    # -- the matched arm for rows computed before it ------------------------------------------

    def replay(self, row: dict[str, Any]) -> RowReplay:
        """A recorded ``row``'s rounds again without training: the same
        crowd submitted to a fresh coordinator of the same settings, its rounds run by the
        product's ``RoundRunner`` with each model's score taken from the row (``Replayed``),
        each candidate's steps counted as training would make them. Returns the steps of the
        lineage it installs, the data single-all trains on, the ledger records and who is
        honest and who bad. The row's judging error is replayed too (rows from before
        it was recorded ran under the paper's 0.05; a swap draws from a stream of its own).
        Raises ``ValueError`` where the row was decided under other rules, or the replay
        differs from the row in anything the row shows: the number of examples, each round's
        candidates, groups' bad members, winner, update and swap, each rule's mean points of
        honest and bad contributors (which pin who was in which group and how the groups
        ranked), or the steps the row records."""
        from crowdsft.coordinator.rounds.runner import NotEnoughContributors, RoundRunner
        from crowdsft.coordinator.store.chain import ledger_entries
        from crowdsft.plugins.manager import get_plugins

        target, seed, fraction = row["target"], int(row["seed"]), float(row["bad_fraction"])
        members = self._members(target, seed, fraction)
        recorded = row["rounds"]
        where = f"{target} seed {seed} at {fraction:.0%} bad"
        judging_error = float(row.get("judging_error", 0.05))
        with self._crowd_coordinator(
            target, seed, members, {"judging_error": judging_error}
        ) as crowd:
            rules = crowd.config.rounds
            for name, ran, now in (
                ("reward", row.get("reward"), rules.reward),
                ("consolidate_every", row.get("consolidate_every"), rules.consolidate_every),
            ):
                if ran is not None and ran != now:
                    raise ValueError(f"{where}: the row ran with {name} {ran!r}, not {now!r}")
            by_node = _round_data_by_node(crowd.coord.store, crowd.space, crowd.config)
            everything = [ex for n in sorted(by_node) for ex in by_node[n]]
            if len(everything) != row["examples"]:
                raise ValueError(
                    f"{where}: {len(everything)} examples to train on, the row says "
                    f"{row['examples']}"
                )
            bad = {n for n in crowd.names if n not in crowd.honest}
            space = Replayed(crowd.space, recorded)
            runner = RoundRunner(crowd.config, crowd.coord.store, space)
            for k, rec in enumerate(recorded):
                try:
                    sm = runner.run()
                except NotEnoughContributors as exc:
                    raise ValueError(f"{where}: no round {k + 1} in the replay ({exc})") from exc
                got = {
                    "updated": sm.updated,
                    "winner": None
                    if not sm.updated
                    else "consolidated"
                    if sm.consolidated_won
                    else sm.winner,
                    "bad_per_group": [sum(1 for n in g if n in bad) for g in sm.groups],
                    "swapped": sm.swapped,
                    "candidates": len(sm.scores),
                }
                want = {key: rec.get(key, got[key]) for key in got}
                want["candidates"] = len(rec["distances"])
                if got != want:
                    raise ValueError(f"{where}, round {k + 1}: replayed {got}, recorded {want}")
            steps = _lineage_steps(crowd.coord.store)
            records = [json.loads(x.record) for x in ledger_entries(crowd.coord.store)]
            by_rule = points_by_rule(records, {}, get_plugins())
            honest = crowd.honest
        for rule, pts in by_rule.items():
            kept = (row.get("points") or {}).get(rule)
            if pts is None or kept is None:
                continue  # credit: the replay trains nothing, so it has no in-run credit
            means = [statistics.fmean(pts.get(n, 1.0) for n in honest)]
            kept_means = [kept["honest"]]
            if bad:
                means.append(statistics.fmean(pts.get(n, 1.0) for n in bad))
                kept_means.append(kept["bad"])
            # (the order of a set's members, and so the last bit of a mean, varies by process)
            if not np.allclose(means, kept_means, rtol=1e-9, atol=0.0):
                raise ValueError(
                    f"{where}: the replayed {rule} points (honest, bad means {means}) differ "
                    f"from the row's {kept_means}"
                )
        if row.get("lineage_steps") is not None and row["lineage_steps"] != steps:
            raise ValueError(
                f"{where}: the replay gives {steps} lineage steps, the row records "
                f"{row['lineage_steps']}"
            )
        return RowReplay(steps, everything, records, set(honest), set(bad))

    def matched_arm(self, row: dict[str, Any]) -> dict[str, Any]:
        """``single_all_matched`` for a row computed before the arm existed: the lineage's
        steps from ``replay``, then the very fine-tune and report the full row runs
        (the same derived seeds, from the untouched base), so that the figure is the one a
        rerun of the row would give."""
        target, seed, fraction = row["target"], int(row["seed"]), float(row["bad_fraction"])
        started = time.monotonic()
        replayed = self.replay(row)
        steps, everything = replayed.lineage_steps, replayed.everything
        pool = self.data.pool(target)
        goal = np.asarray(self.embedder.embed([p.text for p in pool])).mean(axis=0)
        matched = self._matched(target, seed, fraction, everything, steps, goal)
        self._reset()
        return {
            "target": target,
            "seed": seed,
            "bad_fraction": fraction,
            "single_all_matched": matched,
            "lineage_steps": steps,
            "single_all_steps": self._steps(len(everything)),
            "seconds": round(time.monotonic() - started, 1),
        }

    # -- one target and seed, every fraction --------------------------------------------------

    def run_target_seed(
        self,
        target: str,
        seed: int,
        fractions: Sequence[float],
        done: dict[float, dict[str, Any]] | None = None,
        on_row: Callable[[dict[str, Any]], None] | None = None,
    ) -> list[dict[str, Any]]:
        """Rows for ``target`` and ``seed``, one per bad fraction (those in ``done`` reused);
        the model is left as it was found."""
        try:
            return self._run_target_seed(target, seed, fractions, done or {}, on_row)
        finally:
            self._reset()

    def _run_target_seed(self, target, seed, fractions, done, on_row) -> list[dict[str, Any]]:
        s = self.settings
        pool = self.data.pool(target)
        goal = np.asarray(self.embedder.embed([p.text for p in pool])).mean(axis=0)
        far = far_emotions(self.centroids(), target, s.far_pools)
        n_honest = -(-len({_key(p.text) for p in pool}) // s.per_contributor)
        most = max(n_bad(n_honest, f) for f in fractions)
        crowd = make_crowd(self.data, target, seed, most, far, s.per_contributor)
        known = next(iter(done.values()), None)
        base = known["base"] if known else None
        single_clean = known["single_clean"] if known else None
        self._kept_stats = dict(known.get("answers", {})) if known else {}
        vectors = np.asarray(self.embedder.embed([p.text for p in pool]))
        target_spread = answer_stats([p.text for p in pool], vectors)["spread"]
        rows = []
        for f in fractions:
            if f in done:
                rows.append(done[f])
                continue
            started = time.monotonic()
            if base is None:
                self._reset()
                base = self._reported(None, derived_seed(target, seed, "report", "base"), goal)
                self._kept_stats["base"] = self.last_stats
                self.say(f"  base model: {base:.4f}")
            members = crowd[:n_honest] + crowd[n_honest : n_honest + n_bad(n_honest, f)]
            row = self._run_fraction(target, seed, f, members, goal, far, single_clean)
            single_clean = row["single_clean"]
            row["base"] = base
            row["target_spread"] = target_spread
            row["answers"] = {
                "base": self._kept_stats.get("base"),
                "single_clean": self._kept_stats.get("single_clean"),
                **row.pop("answers_own"),
            }
            row["seconds"] = round(time.monotonic() - started, 1)
            rows.append(row)
            if on_row is not None:
                on_row(row)
        return rows

    def _run_fraction(
        self,
        target: str,
        seed: int,
        fraction: float,
        members: list[Member],
        goal: np.ndarray,
        far: list[str],
        single_clean: float | None,
    ) -> dict[str, Any]:
        from crowdsft.coordinator.rounds.runner import NotEnoughContributors, RoundRunner
        from crowdsft.coordinator.store import queries
        from crowdsft.coordinator.store.chain import ledger_entries
        from crowdsft.coordinator.training.space import Candidate
        from crowdsft.demo.run import _verify_nodes
        from crowdsft.plugins.manager import get_plugins

        s = self.settings
        tag = (target, seed)
        with self._crowd_coordinator(target, seed, members) as crowd:
            coord, config, names, honest, space = (
                crowd.coord,
                crowd.config,
                crowd.names,
                crowd.honest,
                crowd.space,
            )
            # the data the rounds can use: accepted, near-duplicates left out
            by_node = _round_data_by_node(coord.store, space, config)
            everything = [ex for n in sorted(by_node) for ex in by_node[n]]
            clean = [ex for n in sorted(by_node) if n in honest for ex in by_node[n]]
            if single_clean is None:
                single_clean = self._single(
                    clean,
                    derived_seed(*tag, "single-clean"),
                    derived_seed(*tag, "report", "single-clean"),
                    goal,
                )
                self._kept_stats["single_clean"] = self.last_stats
                self.say(f"  single-clean ({len(clean)} comments): {single_clean:.4f}")
            if len(everything) == len(clean):
                single_all = single_clean  # no bad data: the same model
                all_stats = self._kept_stats.get("single_clean")
            else:
                single_all = self._single(
                    everything,
                    derived_seed(*tag, "single-all", fraction),
                    derived_seed(*tag, "report", "single-all", fraction),
                    goal,
                )
                all_stats = self.last_stats
            all_steps = self._steps(len(everything))
            self.say(
                f"  {fraction:.0%} bad: single-all ({len(everything)} comments): {single_all:.4f}"
            )
            self._reset()
            space.chain = ()
            runner = RoundRunner(config, coord.store, space, on_event=self._progress())
            summaries = []
            for r in range(s.rounds):
                try:
                    summaries.append(runner.run())
                except NotEnoughContributors as exc:
                    self.say(f"  no round {r + 1}: {exc}")
                    break
                self.say("  " + _round_line(summaries[-1], names))
            final = Candidate(tuple(runner.lineage()))
            space.materialise(final)
            tournament = self._reported(
                None, derived_seed(*tag, "report", "tournament", fraction), goal
            )
            tournament_stats = self.last_stats
            store = coord.store
            records = [json.loads(x.record) for x in ledger_entries(store)]
            credits = {
                r.round_id: [c.training.get("member_credit") for c in r.candidates]
                for r in queries.finished_rounds(store)
            }
            by_rule = points_by_rule(records, credits, get_plugins())
            lineage_steps = _lineage_steps(store)
            verified = None
            if self.via_grpc:
                verified = _verify_nodes(
                    [_as_contributor(m) for m in members], coord.address, crowd.root
                )
        matched = self._matched(target, seed, fraction, everything, lineage_steps, goal)
        if matched is not None:
            self.say(
                f"  {fraction:.0%} bad: single-all with the lineage's {lineage_steps} steps: "
                f"{matched:.4f}"
            )
        self._reset()
        bad_names = {n for n in names if n not in honest}
        aucs = {
            rule: (
                None
                if pts is None
                else auc([pts.get(n, 1.0) for n in honest], [pts.get(n, 1.0) for n in bad_names])
            )
            for rule, pts in by_rule.items()
        }
        reduction = 100.0 * (single_all - tournament) / single_all if single_all else float("nan")
        row = {
            "target": target,
            "seed": seed,
            "bad_fraction": fraction,
            "honest": len(honest),
            "bad": len(bad_names),
            "bad_pools": far,
            "examples": len(everything),
            "single_all": single_all,
            "single_clean": single_clean,
            "tournament": tournament,
            "single_all_matched": matched,
            "lineage_steps": lineage_steps,
            "single_all_steps": all_steps,
            "reduction_percent": reduction,
            "auc": aucs,
            "answers_own": {"single_all": all_stats, "tournament": tournament_stats},
            "rounds": [
                {
                    "round_id": sm.round_id,
                    "updated": sm.updated,
                    "winner": (
                        None
                        if not sm.updated
                        else "consolidated"
                        if sm.consolidated_won
                        else sm.winner
                    ),
                    "base_distance": -sm.base_score,
                    "distances": [-x for x in sm.scores],
                    "bad_per_group": [sum(1 for n in g if n in bad_names) for g in sm.groups],
                    "swapped": sm.swapped,
                }
                for sm in summaries
            ],
            "points": {
                rule: None
                if pts is None
                else {
                    "honest": statistics.fmean(pts.get(n, 1.0) for n in honest),
                    "bad": (
                        statistics.fmean(pts.get(n, 1.0) for n in bad_names) if bad_names else None
                    ),
                }
                for rule, pts in by_rule.items()
            },
            "reward": config.rounds.reward,
            "judging_error": config.rounds.judging_error,
            "consolidate_every": config.rounds.consolidate_every,
        }
        if verified is not None:
            row["nodes_verified"] = f"{verified['ok']} of {len(members)}"
            row["verify_problems"] = verified["problems"][:5]
        self.say(
            f"  {fraction:.0%} bad: tournament {tournament:.4f} against single-all "
            f"{single_all:.4f} ({reduction:+.1f}%), single-clean {single_clean:.4f}; AUC "
            + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}'}" for k, v in aucs.items())
        )
        return row

    def _progress(self) -> Callable[[str, dict[str, Any]], None]:
        started: dict[str, float] = {}

        def event(kind: str, info: dict[str, Any]) -> None:
            if kind == "candidate_training":
                started["t"] = time.monotonic()
            elif kind == "candidate_trained":
                self.say(
                    f"    round {info['round_id']}: candidate {info['group']} trained in "
                    f"{time.monotonic() - started.get('t', time.monotonic()):.0f}s"
                )

        return event


@dataclass
class CrowdCoordinator:
    """What ``CrowdExperiment._crowd_coordinator`` sets up: its folder, the running
    coordinator and its config, each node id's member name, the honest node ids, and the
    model space."""

    root: Path
    coord: Any
    config: Any
    names: dict[str, str]
    honest: set[str]
    space: Any


@dataclass
class RowReplay:
    """What ``CrowdExperiment.replay`` recovers of a recorded row: the lineage's optimizer
    steps, the data single-all trains on, the ledger records of the rounds, and the honest
    and bad contributors' node ids."""

    lineage_steps: int
    everything: list[dict[str, str]]
    records: list[dict[str, Any]]
    honest: set[str]
    bad: set[str]


class Replayed:
    """A model space for the round engine that trains and samples nothing: each candidate's
    optimizer steps are counted as ``LLMSpace`` training would make them (the epoch rule
    over the job's examples, in batches), and every score is the one a recorded row's
    ``rounds`` hold (minus the distance). Given the same crowd and settings, the engine then
    makes the recorded decisions and plans the recorded candidates, so the steps of the
    lineage it installs are those of the row's run."""

    def __init__(self, space: Any, rounds: list[dict[str, Any]]) -> None:
        self.space, self.rounds = space, rounds
        self.round_id = 0
        self.n_contributors = 0
        self._made: dict[str, tuple[int, int]] = {}
        self._info: dict[str, dict[str, Any]] = {}

    def set_data(self, data: Sequence[Sequence[dict[str, str]]]) -> None:
        self.space.set_data(data)
        self.n_contributors = len(data)

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        return np.asarray(self.space.embed(texts))

    def begin_round(self, round_id: int) -> None:
        if not 1 <= round_id <= len(self.rounds):
            raise ValueError(f"round {round_id} is not among the {len(self.rounds)} recorded")
        self.round_id = round_id

    def propose(self, base: Any, members: np.ndarray, weights: np.ndarray, rng: Any) -> Any:
        from crowdsft.coordinator.training.space import Candidate

        job = self.space.job(members, weights, rng)
        n = len(job.examples)
        group = sum(1 for r, _ in self._made.values() if r == self.round_id)
        digest = hashlib.sha256(f"replayed/{self.round_id}/{group}".encode()).hexdigest()
        self._made[digest] = (self.round_id, group)
        steps = job.training.epochs_for(n) * -(-n // job.training.batch_size)
        if job.training.max_steps is not None:  # as ``lora.fit`` counts them
            steps = min(steps, job.training.max_steps)
        self._info[digest] = {"steps": steps, "examples": n, "seed": job.training.seed}
        return Candidate(base.lineage, digest)

    def training_info(self, adapter: str) -> dict[str, Any]:
        return dict(self._info[adapter])

    def materialise(self, base: Any) -> None:
        pass

    def score(self, models: Sequence[Any]) -> np.ndarray:
        out = []
        for m in models:
            if m.adapter is None:
                out.append(-float(self.rounds[self.round_id - 1]["base_distance"]))
            else:
                r, g = self._made[m.adapter]
                out.append(-float(self.rounds[r - 1]["distances"][g]))
        return np.array(out)


def _as_contributor(m: Member) -> Any:
    from crowdsft.demo.crowd import Contributor

    return Contributor(m.name, "honest" if m.honest else "bad", m.examples)


def _round_data_by_node(store: Any, space: Any, config: Any) -> dict[str, list[dict[str, str]]]:
    """``demo.run._round_data`` per node: what the rounds can train on, by contributor."""
    from crowdsft.coordinator.rounds import copies
    from crowdsft.coordinator.store import queries
    from crowdsft.validation import payload_examples, training_order

    rows = queries.unflagged_contributions(store)
    flagged: set[int] = set()
    threshold = config.admission.near_duplicate_threshold
    if threshold > 0:
        found = copies.flag_rows(
            rows, queries.never_used_seqs(store), copies.EmbeddingCache(space.embed), threshold
        )
        flagged = {copy.seq for copy, _, _ in found}
    by_node: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        if r.seq not in flagged:
            by_node.setdefault(r.node_id, []).extend(payload_examples(r.payload))
    return {n: training_order(v) for n, v in by_node.items()}


def _lineage_steps(store: Any) -> int:
    """The optimizer steps of the lineage the rounds installed: each updated round's winning
    candidate's, as its training recorded them."""
    from crowdsft.coordinator.store import queries

    steps = 0
    for done in queries.finished_rounds(store):
        if done.updated and done.winner is not None:
            won = {c.group: c for c in done.candidates}[done.winner]
            steps += int(won.training["steps"])
    return steps


def _round_line(summary: Any, names: dict[str, str]) -> str:
    bad = [sum(1 for n in g if not names.get(n, "").startswith("honest-")) for g in summary.groups]
    scores = ", ".join(f"{-x:.3f}" for x in summary.scores)
    if not summary.updated:
        result = "kept the model"
    elif summary.consolidated_won:
        result = "the consolidated candidate won"
    else:
        result = f"group {summary.winner} won"
    return (
        f"round {summary.round_id}: base {-summary.base_score:.3f}, candidates [{scores}] "
        f"(bad members per group {bad}), {result}"
    )


# -- the whole run ----------------------------------------------------------------------------


def read_done(path: Path, key: str) -> tuple[dict[tuple[str, int, float], dict[str, Any]], int]:
    done: dict[tuple[str, int, float], dict[str, Any]] = {}
    skipped = 0
    if not path.exists():
        return done, skipped
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            ok = row.get("run_key") == key
            ident = (str(row["target"]), int(row["seed"]), float(row["bad_fraction"]))
        except (ValueError, KeyError, TypeError, AttributeError):
            ok = False
        if ok:
            done[ident] = row
        else:
            skipped += 1
    return done, skipped


def _closer_on_targets(rows: list[dict[str, Any]], arm: str) -> int:
    """On how many targets the tournament is closer than ``arm`` (distances averaged over
    each target's seeds first)."""
    closer = 0
    for t in {r["target"] for r in rows}:
        of_t = [r for r in rows if r["target"] == t]
        closer += statistics.fmean(r["tournament"] for r in of_t) < statistics.fmean(
            r[arm] for r in of_t
        )
    return closer


def summarise(rows: list[dict[str, Any]], fractions: Sequence[float]) -> dict[str, Any]:
    """Means by bad fraction: the reduction against single-all, how much of the oracle's
    room (single-all - single-clean) the tournament closes, on how many targets it is closer
    than single-all (distances averaged over seeds first), the paired difference from
    single-all with its 95% interval over target-seeds, and each rule's mean AUC."""
    out: dict[str, Any] = {"mean_reduction_percent": {}, "by_fraction": {}}
    for f in fractions:
        mine = [r for r in rows if r["bad_fraction"] == f]
        if not mine:
            continue
        key = f"{f:g}"
        s_all = statistics.fmean(r["single_all"] for r in mine)
        s_clean = statistics.fmean(r["single_clean"] for r in mine)
        tour = statistics.fmean(r["tournament"] for r in mine)
        diff_mean, diff_ci = mean_ci95([r["tournament"] - r["single_all"] for r in mine])
        targets = sorted({r["target"] for r in mine})
        closer = _closer_on_targets(mine, "single_all")
        room = s_all - s_clean
        aucs = {}
        for rule in REWARDS:
            vals = [r["auc"][rule] for r in mine if r["auc"].get(rule) is not None]
            aucs[rule] = statistics.fmean(vals) if vals else None
        spread = {}
        for arm in ("base", "single_all", "single_clean", "tournament"):
            vals = [r["answers"][arm]["spread"] for r in mine if (r.get("answers") or {}).get(arm)]
            spread[arm] = statistics.fmean(vals) if vals else None
        targets_spread = [r["target_spread"] for r in mine if "target_spread" in r]
        spread["target_pool"] = statistics.fmean(targets_spread) if targets_spread else None
        # rows from before the matched arm (or whose rounds never updated) have none
        paired = [r for r in mine if r.get("single_all_matched") is not None]
        matched = None
        if paired:
            m_closer = _closer_on_targets(paired, "single_all_matched")
            m_targets = {r["target"] for r in paired}
            m_mean, m_ci = mean_ci95([r["tournament"] - r["single_all_matched"] for r in paired])
            matched = {
                "target_seeds": len(paired),
                "single_all_matched": statistics.fmean(r["single_all_matched"] for r in paired),
                "tournament": statistics.fmean(r["tournament"] for r in paired),
                "closer_than_single_all_matched": f"{m_closer} of {len(m_targets)} targets",
                "tournament_minus_single_all_matched": m_mean,
                "tournament_minus_single_all_matched_ci95": m_ci,
            }
        out["mean_reduction_percent"][key] = statistics.fmean(r["reduction_percent"] for r in mine)
        out["by_fraction"][key] = {
            "target_seeds": len(mine),
            "base": statistics.fmean(r["base"] for r in mine),
            "single_all": s_all,
            "single_clean": s_clean,
            "tournament": tour,
            "room_closed": (s_all - tour) / room if room > 0 else None,
            "closer_than_single_all": f"{closer} of {len(targets)} targets",
            "tournament_minus_single_all": diff_mean,
            "tournament_minus_single_all_ci95": diff_ci,
            "mean_auc": aucs,
            "mean_spread": spread,
            "matched_steps": matched,
        }
    return out


def load_models(model_spec: str, device: Any, dtype: Any) -> tuple[Any, Any, Any, Any]:
    """The experiment's model and tokenizer, its embedder (``goemotions``: distances) and
    the near-duplicate check's (``minilm``), on ``device``."""
    from crowdsft.coordinator.training import lora as llm
    from crowdsft.plugins.manager import get_plugins

    model, tokenizer = llm.load_base_model(model_spec, device, dtype)
    plugins = get_plugins()
    return (
        model,
        tokenizer,
        plugins.create("embedder", "goemotions", device=str(device)),
        plugins.create("embedder", "minilm", device=str(device)),
    )


def run(
    data: PaperData,
    targets: list[str],
    seeds: list[int],
    fractions: Sequence[float],
    settings: CrowdSettings,
    model_spec: str = "smollm2",
    device: str = "auto",
    dtype: str = "auto",
    quick: bool = False,
    say: Callable[[str], None] = print,
    on_row: Callable[[dict[str, Any]], None] | None = None,
    done: dict[tuple[str, int, float], dict[str, Any]] | None = None,
    via_grpc: bool = False,
) -> dict[str, Any]:
    """Load the model and the embedders once, run every target, seed and fraction."""
    from crowdsft.experiment.paper_llm import device_and_precision

    started = time.monotonic()
    done = done or {}
    dev, torch_dtype = device_and_precision(device, dtype)
    precision = str(torch_dtype).removeprefix("torch.")
    key = run_key(settings, model_spec, data.digest(), precision, quick)
    wanted = [(t, s) for s in seeds for t in targets]
    rows: list[dict[str, Any]] = []
    missing = [(t, s) for t, s in wanted if any((t, s, f) not in done for f in fractions)]
    if missing:
        if quick:  # a tiny model and no embedding model either: a machinery check
            from crowdsft.testing.standin import TrigramEmbedder
            from crowdsft.testing.tiny import tiny_model

            model, tokenizer = tiny_model()
            model = model.to(dev, torch_dtype)
            model_spec = "tiny random Llama (--quick)"
            embedder = copy_embedder = TrigramEmbedder()
        else:
            say(f"loading {model_spec} on {dev} ({precision}) and the embedders")
            model, tokenizer, embedder, copy_embedder = load_models(model_spec, dev, torch_dtype)
        experiment = CrowdExperiment(
            data, model, tokenizer, embedder, copy_embedder, settings, say, via_grpc
        )
    total = len(wanted)
    for i, (target, seed) in enumerate(wanted, 1):
        mine = {f: done[(target, seed, f)] for f in fractions if (target, seed, f) in done}
        if len(mine) == len(fractions):
            rows += [mine[f] for f in fractions]
            say(f"[{i}/{total}] {target} seed {seed}: reused from the earlier run")
            continue
        say(f"[{i}/{total}] {target} seed {seed}:")

        def tagged(row: dict[str, Any]) -> None:
            row.update(run_key=key, device=str(dev), dtype=precision)
            if on_row is not None:
                on_row(row)

        rows += experiment.run_target_seed(target, seed, fractions, mine, tagged)
    return {
        "targets": rows,
        **summarise(rows, fractions),
        "bad_fractions": list(fractions),
        "held_out": True,
        "selection_set": settings.answers,
        "reported_set": settings.answers,
        "settings": asdict(settings),
        "model": model_spec,
        "embedder": "trigrams (--quick)" if quick else "goemotions",
        "device": str(dev),
        "dtype": precision,
        "run_key": key,
        "resumed": sum(1 for r in rows if (r["target"], r["seed"], r["bad_fraction"]) in done),
        "seconds": round(time.monotonic() - started, 1),
    }


def table(result: dict[str, Any]) -> list[str]:
    lines = [
        f"{'target':<15}{'seed':>5}{'bad':>5}{'base':>8}{'single-all':>11}{'single-clean':>13}"
        f"{'tournament':>11}{'reduction':>10}   AUC rank / regression / credit"
    ]

    def fmt(v: float | None) -> str:
        return " n/a" if v is None else f"{v:.2f}"

    for r in result["targets"]:
        a = r["auc"]
        lines.append(
            f"{r['target']:<15}{r['seed']:>5}{r['bad_fraction']:>5.0%}{r['base']:>8.4f}"
            f"{r['single_all']:>11.4f}{r['single_clean']:>13.4f}{r['tournament']:>11.4f}"
            f"{r['reduction_percent']:>9.1f}%   " + " / ".join(fmt(a.get(k)) for k in REWARDS)
        )
    lines.append("")
    lines.append(
        "distances: mean L2 of 50 sampled answers' vectors to the target centroid in the "
        "goemotions space (lower is better), all on answers no choice saw"
    )
    for f, b in result["by_fraction"].items():
        closed = b["room_closed"]
        lines.append(
            f"{float(f):.0%} bad ({b['target_seeds']} target-seeds): base {b['base']:.4f}, "
            f"single-all {b['single_all']:.4f}, single-clean {b['single_clean']:.4f}, "
            f"tournament {b['tournament']:.4f}; reduction vs single-all "
            f"{result['mean_reduction_percent'][f]:+.1f}%, "
            + ("" if closed is None else f"room closed {closed:.0%}, ")
            + f"closer than single-all on {b['closer_than_single_all']}; tournament - "
            f"single-all {b['tournament_minus_single_all']:+.4f} ± "
            f"{b['tournament_minus_single_all_ci95']:.4f}; mean AUC "
            + ", ".join(f"{k} {fmt(v)}" for k, v in b["mean_auc"].items())
            + "; answers' spread "
            + ", ".join(f"{k} {fmt(v)}" for k, v in b["mean_spread"].items())
        )
        m = b.get("matched_steps")
        if m:
            lines.append(
                f"  against single-all trained as many steps as the lineage "
                f"({m['target_seeds']} target-seeds): {m['single_all_matched']:.4f} against "
                f"the tournament's {m['tournament']:.4f}; closer on "
                f"{m['closer_than_single_all_matched']}; tournament - matched "
                f"{m['tournament_minus_single_all_matched']:+.4f} ± "
                f"{m['tournament_minus_single_all_matched_ci95']:.4f}"
            )
    lines.append(
        f"{len(result['targets'])} rows in {result['seconds']:.0f}s on {result['device']} "
        f"({result['dtype']})" + (f", {result['resumed']} reused" if result.get("resumed") else "")
    )
    return lines


def settings_with(settings: CrowdSettings, **changes: Any) -> CrowdSettings:
    return dataclasses.replace(settings, **{k: v for k, v in changes.items() if v is not None})
